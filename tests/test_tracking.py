"""run.log_to: TensorBoard gets every round's figures, read back here with TensorBoard's own reader."""

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="tracking needs the optional extra fedmml[tracking]")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import fedmml  # noqa: E402
from fedmml.federation.checkpoint import checkpoints  # noqa: E402
from fedmml.runs import CHECKPOINTS, read_metrics  # noqa: E402

ROUNDS = ["schedules.uniform.rounds=[1, 2, 0]", "run.threads=1", "run.keep_checkpoints=0"]


def _read(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_a_tracked_run_logs_every_rounds_figures_and_trains_as_an_untracked_one(
    emoji_root: Path, tmp_path: Path
) -> None:
    base = [f'data.root="{emoji_root}"', *ROUNDS]
    tracked = fedmml.run(fedmml.load_config("tiny", [*base, 'run.log_to=["tensorboard"]']), tmp_path / "tb")
    plain = fedmml.run(fedmml.load_config("tiny", base), tmp_path / "plain")
    assert not (tmp_path / "plain" / "tensorboard").exists()
    for key in ("rsum", "bytes_up_total", "client_flops_total"):
        assert tracked[key] == plain[key]
    metrics = read_metrics(tmp_path / "tb")
    events = _read(tmp_path / "tb" / "tensorboard")
    for tag in ("train_loss", "bytes_up", "bytes_down", "stage", "client_peak_mem_bytes"):
        assert _scalars(events, tag) == [(m["round"], pytest.approx(m[tag], rel=1e-6)) for m in metrics]
    assert [s for s, _ in _scalars(events, "rsum")] == [m["round"] for m in metrics if "rsum" in m]
    tensors = events.Tags()["tensors"]
    assert {"config/text_summary", "summary/text_summary", "report/text_summary"} <= set(tensors)
    final = _read(tmp_path / "tb" / "tensorboard" / "final")
    assert final.Scalars("final/rsum")[0].value == pytest.approx(tracked["rsum"])


def test_a_resumed_run_replaces_the_rounds_it_redoes(emoji_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = fedmml.load_config("tiny", [f'data.root="{emoji_root}"', *ROUNDS, 'run.log_to=["tensorboard"]'])
    fedmml.run(cfg, run_dir)
    whole = _scalars(_read(run_dir / "tensorboard"), "train_loss")
    # Stopped after round 1: its later checkpoints and outputs gone, its TensorBoard log still holding 1-3.
    for path in checkpoints(run_dir / CHECKPOINTS)[:-1]:
        path.unlink()
    for name in ("summary.json", "model.safetensors"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "tensorboard" / "final")
    fedmml.resume(run_dir)
    again = _scalars(_read(run_dir / "tensorboard"), "train_loss")
    assert [s for s, _ in again] == [1, 2, 3]  # each round once
    assert again == [(s, pytest.approx(v, rel=1e-6)) for s, v in whole]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3


def test_an_unknown_tracker_is_one_line() -> None:
    with pytest.raises(fedmml.ConfigError, match="run.log_to"):
        fedmml.load_config("tiny", {"run.log_to": ["wandb"]})
