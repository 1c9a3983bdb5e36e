"""Stage planning and the trainable/frozen split of each method."""

import pytest
import torch

from fedmml.config import ConfigError, Schedule, load_config
from fedmml.methods import configure, frozen_modules, plan_stages, set_train_mode, trainable_keys
from fedmml.models.build import build_model

SCHEDULE = Schedule(
    rounds=[1, 0, 2],
    blocks={"image": [2, 2, 2], "text": [1, 1, 1]},
    lr={"image": [0.1, 0.2, 0.3], "text": [1.0, 2.0, 3.0], "heads": [5.0, 6.0, 7.0]},
)
TOTALS = {"image": 6, "text": 3}


def test_plan_lw_and_prog_grow_stage_by_stage() -> None:
    for method in ("lw", "prog"):
        stages = plan_stages(SCHEDULE, method, TOTALS)
        assert [s.depth for s in stages] == [
            {"image": 2, "text": 1},
            {"image": 4, "text": 2},
            {"image": 6, "text": 3},
        ]
        assert stages[1].new_blocks == {"image": (2, 3), "text": (1,)}
        assert [s.rounds for s in stages] == [1, 0, 2]
        assert stages[2].lr == {"image": 0.3, "text": 3.0, "heads": 7.0}


def test_plan_e2e_is_one_full_depth_stage_with_the_same_budget() -> None:
    (stage,) = plan_stages(SCHEDULE, "e2e", TOTALS)
    assert stage.rounds == 3 and stage.depth == {"image": 6, "text": 3}
    assert stage.lr == {"image": 0.3, "text": 3.0, "heads": 7.0}


def test_schedule_deeper_than_encoder_is_an_error_before_training() -> None:
    with pytest.raises(ConfigError, match="adds 6 image blocks, but the image encoder has only 4"):
        plan_stages(SCHEDULE, "lw", {"image": 4, "text": 3})


@pytest.fixture
def tiny_model():
    return build_model(load_config("tiny").model, load_weights=False)


def _grown(model, stage):
    for m, d in stage.depth.items():
        model.encoders[m].grow_to(d)
    return model


def test_lw_trains_only_new_blocks_norms_necks_heads(tiny_model) -> None:
    stages = plan_stages(SCHEDULE, "lw", TOTALS)
    model = _grown(tiny_model, stages[1])
    keys = configure(model, "lw", stages[1])
    blocks = {k.split(".")[1] + "." + k.split(".")[3] for k in keys if ".blocks." in k}
    assert blocks == {"image.2", "image.3", "text.1"}
    assert not any(".stem." in k for k in keys)
    assert any(k.startswith("heads.image.") for k in keys) and any(".norm." in k for k in keys)
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and grads <= set(keys)
    assert trainable_keys(model, "lw", stages[1]) == keys
    # Frozen parts run in eval mode (no dropout, fixed norm statistics); trainable parts in train mode.
    set_train_mode(model, "lw", stages[1])
    frozen = frozen_modules(model, "lw", stages[1])
    assert model.encoders["image"].stem in frozen and all(not m.training for m in frozen)
    assert model.encoders["image"].blocks[2].training and model.heads.training


def test_lw_first_stage_trains_the_stem(tiny_model) -> None:
    stage = plan_stages(SCHEDULE, "lw", TOTALS)[0]
    keys = configure(_grown(tiny_model, stage), "lw", stage)
    assert any(k.startswith("encoders.image.stem.") for k in keys)
    assert any(k.startswith("encoders.text.stem.") for k in keys)


def test_prog_and_e2e_train_everything_present(tiny_model) -> None:
    stage = plan_stages(SCHEDULE, "prog", TOTALS)[2]
    model = _grown(tiny_model, stage)
    assert set(configure(model, "prog", stage)) == set(model.state_dict())
    assert not frozen_modules(model, "prog", stage)


def test_frozen_trains_only_necks_and_heads_on_the_full_depth(tiny_model) -> None:
    (stage,) = plan_stages(SCHEDULE, "frozen", TOTALS)
    assert stage == plan_stages(SCHEDULE, "e2e", TOTALS)[0]
    model = _grown(tiny_model, stage)
    keys = configure(model, "frozen", stage)
    assert keys and not any(k.startswith("encoders.") and ".neck." not in k for k in keys)
    assert any(k.startswith("heads.") for k in keys)
    set_train_mode(model, "frozen", stage)
    assert all(not e.norm.training and not e.stem.training for e in model.encoders.values())
    assert model.heads.training


def _run(emoji_root, tmp_path, method: str, *extra: str) -> tuple[dict, list[dict]]:
    from fedmml.experiment import run_experiment
    from fedmml.runs import read_metrics

    overrides = [f'data.root="{emoji_root}"', f'run.method="{method}"', "run.threads=1", *extra]
    summary = run_experiment(load_config("tiny", overrides), tmp_path / method)
    return summary, read_metrics(tmp_path / method)


@pytest.mark.slow
def test_frozen_run_leaves_the_encoders_as_they_were_and_sends_them_once(emoji_root, tmp_path) -> None:
    from fedmml.runs import load_run_model
    from fedmml.setup import final_depth, global_model

    summary, records = _run(emoji_root, tmp_path, "frozen")
    cfg = load_config("tiny", [f'data.root="{emoji_root}"'])
    model = global_model(cfg, torch.device("cpu"))
    for modality, depth in final_depth(cfg).items():
        model.encoders[modality].grow_to(depth)
    start, trained = model.state_dict(), load_run_model(tmp_path / "frozen")[1].state_dict()
    assert set(start) == set(trained)
    for key, value in start.items():
        if key.startswith("encoders.") and ".neck." not in key:
            assert (trained[key] == value).all(), key
    assert any((trained[k] != v).any() for k, v in start.items() if k.startswith("heads."))
    # The encoders travel down once (round 1); after that only the heads go both ways.
    assert records[1]["bytes_down"] < records[0]["bytes_down"] / 10
    assert all(r["bytes_up"] == pytest.approx(records[1]["bytes_down"], rel=0.01) for r in records[1:])
    assert all(r["upload_parts"]["encoder_blocks"] == r["upload_parts"]["stems"] == 0 for r in records)
    # The cached run (every block's output kept) trains exactly as the uncached one.
    uncached, _ = _run(emoji_root, tmp_path / "nocache", "frozen", "cache.frozen_prefix=false")
    assert uncached["rsum"] == pytest.approx(summary["rsum"], abs=1e-6)
    assert summary["client_flops_total"] < uncached["client_flops_total"] / 2


@pytest.mark.slow
def test_centralized_is_one_client_with_every_training_sample(emoji_root, tmp_path) -> None:
    short = "schedules.uniform.rounds=[1, 1, 0]"
    summary, records = _run(emoji_root, tmp_path, "centralized", 'partition.kind="dirichlet"', short)
    e2e, _ = _run(emoji_root, tmp_path, "e2e", short)
    assert summary["clients"] == 1 and summary["client_samples"] == {"0": e2e["train_images"]}
    assert [r["clients"] for r in records] == [[0]] * e2e["rounds"]
    # The same passes over the same samples as the federation: the same client FLOPs to within the batch
    # remainders (the federation's three clients each drop a short last batch or not).
    assert summary["client_flops_total"] == pytest.approx(e2e["client_flops_total"], rel=0.02)
    with pytest.raises(ConfigError, match="centralized needs one shared dataset"):
        roots = 'data.client_roots=["a", "b", "c"]'
        _run(emoji_root, tmp_path / "local", "centralized", 'partition.kind="local"', roots)


def test_prog_can_train_earlier_blocks_at_a_smaller_rate(tiny_model) -> None:
    from fedmml.federation.training import make_optimizer

    stage = plan_stages(SCHEDULE, "prog", TOTALS)[1]  # image blocks 2-3 and text block 1 are new
    model = _grown(tiny_model, stage)
    configure(model, "prog", stage)
    cfg = load_config("tiny", ['run.method="prog"', "federation.prog_earlier_lr_scale=0.1"])
    rate = {
        id(p): g["lr"] for g in make_optimizer(model, stage, cfg, "prog").param_groups for p in g["params"]
    }
    params = dict(model.named_parameters())
    assert rate[id(params["encoders.image.blocks.2.mlp.fc1.weight"])] == 0.2  # new: the stage's rate
    assert rate[id(params["encoders.image.blocks.1.mlp.fc1.weight"])] == pytest.approx(0.02)
    stem = next(n for n in params if n.startswith("encoders.text.stem."))
    assert rate[id(params[stem])] == pytest.approx(0.2)  # text's stage-2 rate is 2.0: x 0.1
    assert rate[id(params["encoders.image.norm.weight"])] == 0.2
    # The paper's Prog (scale 1) and every other method: one rate per group.
    plain = load_config("tiny", ['run.method="prog"'])
    assert {g["lr"] for g in make_optimizer(model, stage, plain, "prog").param_groups} == {0.2, 2.0, 6.0}
