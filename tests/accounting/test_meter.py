"""Measured client cost inside real runs (tiny preset, real emoji images): round and summary keys, caches."""

import json
from pathlib import Path

import pytest
import torch

from fedmml.accounting import StepMeter
from fedmml.accounting.memory import CPU_METHOD
from fedmml.accounting.meter import MEMORY_STEPS, stage_key
from fedmml.config import load_config
from fedmml.experiment import build_setup, run_experiment
from fedmml.federation.training import input_shapes, make_optimizer
from fedmml.methods import configure, plan_stages, set_train_mode
from fedmml.models.build import build_model


def _cfg(emoji_root: Path, method: str, *extra: str):
    return load_config(
        "tiny", [f'data.root="{emoji_root}"', f'run.method="{method}"', "eval.every=0", *extra]
    )


@pytest.fixture(scope="module")
def lw_run(emoji_root: Path):
    setup = build_setup(_cfg(emoji_root, "lw"))
    replies = []
    engine_dispatch = setup.engine.dispatch

    def dispatch(outgoing):
        out = list(engine_dispatch(outgoing))
        replies.append([r for _, r in out])
        return out

    setup.engine.dispatch = dispatch
    return setup, setup.server.run(setup.engine), replies


def test_rounds_report_client_flops_and_peak_memory(lw_run) -> None:
    _, metrics, replies = lw_run
    for record, round_replies in zip(metrics, replies, strict=True):
        assert record["client_flops"] == sum(r.meta["flops"] for r in round_replies) > 0
        assert record["client_peak_mem_bytes"] > 0


def test_memory_is_measured_once_per_stage_by_the_client_the_server_names(lw_run) -> None:
    setup, metrics, replies = lw_run
    meter = setup.clients[0].workspace.meter
    assert len(meter.memory) == len(setup.server.stages)
    first_of_stage = {}
    for record, round_replies in zip(metrics, replies, strict=True):
        measured = [r for r in round_replies if r.meta["peak_mem_bytes"]]
        if record["stage"] in first_of_stage:
            assert not measured  # the stage's figure is reused, not measured again
            assert record["client_peak_mem_bytes"] == first_of_stage[record["stage"]]
        else:
            # the first client of the stage's first round measures; the round reports its figure
            assert [r.meta["cid"] for r in measured] == [record["clients"][0]]
            first_of_stage[record["stage"]] = measured[0].meta["peak_mem_bytes"]
            assert record["client_peak_mem_bytes"] == first_of_stage[record["stage"]]


def test_frozen_parameters_hold_no_stale_gradients(lw_run) -> None:
    setup, _, _ = lw_run
    model = setup.clients[0].workspace.model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_summary_has_cost_totals(emoji_root: Path, tmp_path: Path) -> None:
    summary = run_experiment(_cfg(emoji_root, "e2e"), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["client_flops_total"] == sum(r["client_flops"] for r in records) > 0
    assert summary["client_peak_mem_bytes"] == max(r["client_peak_mem_bytes"] for r in records) > 0
    assert summary["memory_method"] == CPU_METHOD
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["memory_method"] == CPU_METHOD


def test_flops_are_counted_once_per_batch_shape() -> None:
    cfg = load_config("tiny")
    model = build_model(cfg.model, load_weights=False)
    stage = plan_stages(cfg.active_schedule, "e2e", {m: e.total_blocks for m, e in model.encoders.items()})[0]
    for modality, depth in stage.depth.items():
        model.encoders[modality].grow_to(depth)
    configure(model, "e2e", stage)
    set_train_mode(model, "e2e", stage)
    opt = make_optimizer(model, stage, cfg, cfg.run.method)
    meter = StepMeter(torch.device("cpu"))
    meter.start("e2e", stage)
    batch = {"image": torch.rand(4, 3, 32, 32), "text": ["a red apple", "a cat", "two dogs", "a green tree"]}
    for _ in range(3):
        with meter.step(model, opt, input_shapes(model, model.prepare(batch)), [batch["image"]]):
            loss = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    cost = meter.finish()
    (per_step,) = meter.step_flops.values()
    assert cost["flops"] == 3 * per_step > 0
    key = stage_key("e2e", stage)
    assert meter._memory_steps[key] == 0 and MEMORY_STEPS == 2
    assert cost["peak_mem_bytes"] == meter.memory[key].peak_bytes > 0
