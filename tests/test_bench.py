"""``fedmml bench resources`` on the tiny preset: per-stage bytes equal a real run's payloads, LW < E2E."""

import json
from pathlib import Path

import pytest

from fedmml.bench import (
    SyntheticCaptions,
    bench_config,
    bench_method,
    method_totals,
    ratios,
    render_markdown,
    rss_cross_check,
    run_bench,
)
from fedmml.cli import main
from fedmml.config import load_config
from fedmml.experiment import build_setup
from fedmml.federation.payload import serialize
from fedmml.methods import plan_stages, trainable_keys
from fedmml.models.build import build_model

# Measures every method's steps, and one check runs in a fresh process: `make test-fast` skips it.
pytestmark = pytest.mark.slow

ROUNDS = "schedules.uniform.rounds=[1, 2, 1]"  # stage 2 has a later round that carries no frozen tensors


@pytest.fixture(scope="module")
def bench_rows():
    cfg = load_config("tiny", [ROUNDS])
    return {m: bench_method(cfg, m)[0] for m in ("e2e", "lw", "prog")}


def test_synthetic_captions_fill_max_length() -> None:
    cfg = load_config("tiny")
    text = build_model(cfg.model, load_weights=False).encoders["text"]
    data = SyntheticCaptions(8, 32, text.tokenizer, text.max_length)
    assert text.tokenize(data.captions)["input_ids"].shape == (8 * 5, text.max_length)
    assert len(data) == 8 and len(data.variants(1)["text"]) == 5 and data[1][1] == data.captions[5]
    assert tuple(data[0][0].shape) == (3, 32, 32)


def test_hub_weights_fall_back_to_the_arch_table() -> None:
    cfg, notes = bench_config(load_config("paper-coco"), "lw")
    assert cfg.model.image.pretrained == "" and cfg.model.text.pretrained == ""
    assert len(notes) == 2 and cfg.federation.local_epochs == 1


def test_lw_step_memory_and_flops_are_below_e2e(bench_rows) -> None:
    (e2e,) = bench_rows["e2e"]
    for row in bench_rows["lw"]:
        assert row["peak_mem_bytes"] < e2e["peak_mem_bytes"]
        assert row["flops_per_step"] < e2e["flops_per_step"]
        assert row["bytes_up"] < e2e["bytes_up"]
    # Prog trains the whole grown model, so its last stage costs what e2e costs.
    assert bench_rows["prog"][-1]["flops_per_step"] == e2e["flops_per_step"]


def test_bench_bytes_equal_the_payloads_of_a_real_run(bench_rows, emoji_root: Path) -> None:
    cfg = load_config("tiny", [f'data.root="{emoji_root}"', 'run.method="lw"', ROUNDS, "eval.every=0"])
    setup = build_setup(cfg)
    rounds = []
    engine_dispatch = setup.engine.dispatch

    def dispatch(outgoing):
        replies = list(engine_dispatch(outgoing))
        rounds.append((dict(outgoing)[0], dict(replies)[0]))  # client 0 takes part in every round
        return replies

    setup.engine.dispatch = dispatch
    setup.server.run(setup.engine)
    first_round = {1: 0, 2: 1, 3: 3}
    for row in bench_rows["lw"]:
        down, up = rounds[first_round[row["stage"]]]
        assert row["bytes_down_first"] == len(down.blob)
        assert row["bytes_up"] == len(up.blob)
    assert bench_rows["lw"][1]["bytes_down_later"] == len(rounds[2][0].blob)


def test_bench_upload_is_the_serialised_trainable_tensors(bench_rows) -> None:
    cfg = load_config("tiny", [ROUNDS])
    model = build_model(cfg.model, load_weights=False)
    stages = plan_stages(cfg.active_schedule, "lw", {m: e.total_blocks for m, e in model.encoders.items()})
    for stage, row in zip(stages, bench_rows["lw"], strict=True):
        for modality, depth in stage.depth.items():
            model.encoders[modality].grow_to(depth)
        state = model.state_dict()
        keys = trainable_keys(model, "lw", stage)
        assert row["bytes_up"] == len(serialize({k: state[k] for k in sorted(keys)}))
        assert sum(row["upload_parts"].values()) == sum(
            state[k].numel() * state[k].element_size() for k in keys
        )


def test_totals_and_ratios_follow_the_schedule() -> None:
    row = {"measured": True, "bytes_up": 10, "bytes_down_first": 30, "bytes_down_later": 10}
    row |= {"fill_flops_per_sample": 0.5, "cache_bytes_per_sample": 7}
    rows = [
        {**row, "rounds": 0, "peak_mem_bytes": 999, "flops_per_sample": 999.0},  # costs nothing
        {**row, "rounds": 3, "peak_mem_bytes": 50, "flops_per_sample": 2.0},
    ]
    t = method_totals(rows, local_epochs=2)
    assert t == {
        "rounds": 3,
        "peak_mem_bytes": 50,
        "flops_per_sample": 3 * 2 * 2.0 + 0.5,  # the cache is filled once per stage
        "cache_bytes_per_sample": 7,
        "bytes_up": 30,
        "bytes_down": 30 + 2 * 10,
        "bytes_total": 80,
    }
    e2e = {"peak_mem_bytes": 100, "flops_per_sample": 25.0, "bytes_total": 160}
    assert ratios({"e2e": e2e, "lw": t}) == {"memory": {"lw": 2.0}, "flops": {"lw": 2.0}, "comm": {"lw": 2.0}}


def test_run_bench_json_and_markdown() -> None:
    # Four rounds per stage: a cache of five captions per image pays off over them (with one round it would
    # not: the fill pass runs the prefix over every caption, training only over the ones drawn).
    result = run_bench(load_config("tiny", ["schedules.uniform.rounds=[4, 4, 4]"]), rss_check=False)
    assert {"preset", "schedule", "memory_method", "per_stage", "totals", "ratios"} <= set(result)
    assert set(result["totals"]) == {"e2e", "lw", "lw-nocache", "prog", "lora"}
    for saving in ("memory", "flops", "comm"):
        assert set(result["ratios"][saving]) == {"lw", "lw-nocache", "prog", "lora"}
        assert result["ratios"][saving]["lw"] > 1
    # The cache saves work and working memory, and costs no bytes on the wire.
    totals = result["totals"]
    assert totals["lw"]["flops_per_sample"] < totals["lw-nocache"]["flops_per_sample"]
    # (Peak memory over the schedule is stage 1's here, where the stems train and nothing is cached.)
    stages = {(r["method"], r["stage"]): r for r in result["per_stage"]}
    for stage in (2, 3):
        assert stages["lw", stage]["peak_mem_bytes"] < stages["lw-nocache", stage]["peak_mem_bytes"]
    assert totals["lw"]["bytes_total"] == totals["lw-nocache"]["bytes_total"]
    assert totals["lw"]["cache_bytes_per_sample"] > 0 == totals["lw-nocache"]["cache_bytes_per_sample"]
    text = render_markdown(result)
    assert "2.70×" in text and "| lw |" in text and "heads share" in text and "lw-nocache measured" in text
    json.dumps(result)


def test_rss_cross_check_in_a_fresh_process() -> None:
    check = rss_cross_check(load_config("tiny", ["federation.batch_size=64"]), "e2e", 0)
    assert check["tracked_growth_bytes"] > 0
    assert check["rss_growth_bytes"] is None or check["rss_growth_bytes"] > 0


def test_cli_bench_resources(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "resources", "--preset", "tiny", "--schedule", "late-heavy", "--json", str(out)]
    assert main([*args, "--no-rss-check"]) == 0
    table = capsys.readouterr().out
    assert "schedule `late-heavy`" in table
    result = json.loads(out.read_text())
    assert result["schedule"] == "late-heavy" and result["preset"] == "tiny"
    assert not any(r["measured"] for r in result["per_stage"] if r["rounds"] == 0)


def test_bench_image_audio() -> None:
    # No data needed: synthetic image + filterbank pairs of the preset's shapes and the given class count.
    cfg = load_config("tiny-av", ["model.num_classes=5", "schedules.uniform.rounds=[2, 2, 2]"])
    result = run_bench(cfg, methods=("e2e", "lw"), rss_check=False)
    totals = result["totals"]
    assert totals["lw"]["bytes_total"] < totals["e2e"]["bytes_total"]
    assert totals["lw"]["cache_bytes_per_sample"] > 0
    rows = [r for r in result["per_stage"] if r["method"] == "lw" and r["stage"] > 1]
    assert all(r["fill_flops_per_sample"] > 0 for r in rows)
