"""run.precision: autocast in training and evaluation; weights, checkpoints and payloads stay float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmml.config import ConfigError, load_config
from fedmml.experiment import run_experiment
from fedmml.precision import autocast, grad_scaler

pytestmark = pytest.mark.slow  # three short training runs


def test_autocast_and_scaler_follow_the_precision() -> None:
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 4)
    with autocast("bf16", cpu):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    with autocast("fp32", cpu):
        assert layer(torch.ones(2, 4)).dtype == torch.float32
    assert grad_scaler("fp16", cpu) is not None and grad_scaler("bf16", cpu) is None
    with pytest.raises(ConfigError, match="run.precision"):
        load_config("tiny", ['run.precision="fp8"'])


def test_a_mixed_precision_run_trains_and_keeps_float32_weights(emoji_root: Path, tmp_path: Path) -> None:
    base = [
        f'data.root="{emoji_root}"',
        'run.method="e2e"',
        "run.threads=1",
        "schedules.uniform.rounds=[1, 1, 0]",
    ]
    runs = {
        p: run_experiment(load_config("tiny", [*base, f'run.precision="{p}"']), tmp_path / p)
        for p in ("fp32", "bf16", "fp16")
    }
    for precision, summary in runs.items():
        # fp16 spends a client's first steps finding its gradient scale (overflowing steps are skipped), and
        # the clients here take one or two steps: it need not learn yet, only run without NaN.
        if precision != "fp16":
            assert summary["rsum"] > summary["chance_rsum"], precision
        weights = load_file(str(tmp_path / precision / "model.safetensors"))
        assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
        # What travels does not depend on the precision the clients computed in (the headers' measured
        # figures, e.g. the loss, differ in their JSON length by a byte or two).
        assert abs(summary["bytes_up_total"] - runs["fp32"]["bytes_up_total"]) < 100
    losses = {
        p: [r["train_loss"] for r in map(json.loads, (tmp_path / p / "metrics.jsonl").open())] for p in runs
    }
    assert all(loss == loss for values in losses.values() for loss in values)  # no NaN
    # Autocast did run in lower precision: the same seeded steps give other losses.
    assert losses["bf16"] != losses["fp32"] and losses["fp16"] != losses["fp32"]
