"""A seeded run repeats: the same config twice on one machine and thread count gives the same figures,
whatever the number of DataLoader workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmml.config import load_config
from fedmml.experiment import run_experiment
from fedmml.runs import read_metrics

pytestmark = pytest.mark.slow

# Times are measurements of the machine, not results of the run.
TIMES = {"wall_s", "eval_s", "client_s", "client_train_s", "client_data_wait_s", "train_s", "aggregate_s"}


def _figures(run: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run / "summary.json").read_text())
    records = [{k: v for k, v in r.items() if k not in TIMES} for r in read_metrics(run)]
    return {k: v for k, v in summary.items() if k not in TIMES}, records


def test_the_same_seeded_run_twice_gives_identical_figures(emoji_root: Path, tmp_path: Path) -> None:
    # LW with augmentation: seeded sampling, caption draws, crops, the frozen-prefix cache and its views.
    overrides = [f'data.root="{emoji_root}"', 'run.method="lw"', "run.threads=1", "data.augment=true"]
    # Two local epochs: persistent workers keep their dataset copy across them.
    overrides += ["schedules.uniform.rounds=[1, 1, 0]", "federation.local_epochs=2"]
    first = run_experiment(load_config("tiny", [*overrides, "data.workers=0"]), tmp_path / "a")
    # The second reads its samples in two DataLoader worker processes: the batches must not change.
    run_experiment(load_config("tiny", [*overrides, "data.workers=2"]), tmp_path / "b")
    assert first["rsum"] > 0
    want, got = _figures(tmp_path / "a"), _figures(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["data"]["workers"] == 2
    assert got[1] == want[1]  # every round: losses, scores, bytes, FLOPs, peak memory
    assert got[0] == want[0]
    # That another seed gives other figures (so this comparison can fail) is in test_cli's compare over seeds.
