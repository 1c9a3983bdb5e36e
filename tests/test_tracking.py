"""run.log_to: TensorBoard and MLflow get every round's figures, read back here with their own readers."""

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="tracking needs the optional extra fedmml[tracking]")
pytest.importorskip("mlflow", reason="tracking needs the optional extra fedmml[tracking]")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

import fedmml  # noqa: E402
from fedmml.federation.checkpoint import checkpoints  # noqa: E402
from fedmml.runs import CHECKPOINTS, read_metrics  # noqa: E402
from fedmml.tracking import MLFLOW_EXPERIMENT, mlflow_uri  # noqa: E402

ROUNDS = ["schedules.uniform.rounds=[1, 2, 0]", "run.threads=1", "run.keep_checkpoints=0"]


def _read(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _mlflow_runs(folder: Path) -> tuple[MlflowClient, list]:
    """The client of the MLflow store in ``folder`` and its live runs (deleted ones are not listed)."""
    client = MlflowClient(tracking_uri=mlflow_uri(folder))
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id])


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_tracked_run_logs_every_rounds_figures_and_trains_as_an_untracked_one(
    emoji_root: Path, tmp_path: Path
) -> None:
    base = [f'data.root="{emoji_root}"', *ROUNDS]
    tracked = fedmml.run(
        fedmml.load_config("tiny", [*base, 'run.log_to=["tensorboard", "mlflow"]']), tmp_path / "tb"
    )
    plain = fedmml.run(fedmml.load_config("tiny", base), tmp_path / "plain")
    assert not (tmp_path / "plain" / "tensorboard").exists()
    assert not (tmp_path / "plain" / "mlflow.db").exists()
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

    client, runs = _mlflow_runs(tmp_path / "tb")
    (run,) = runs
    assert run.info.status == "FINISHED" and run.info.run_name == "tb"
    for tag in ("train_loss", "bytes_up", "bytes_down", "stage", "client_peak_mem_bytes"):
        assert _history(client, run.info.run_id, tag) == [
            (m["round"], pytest.approx(m[tag], rel=1e-6)) for m in metrics
        ]
    assert run.data.metrics["final/rsum"] == pytest.approx(tracked["rsum"])
    assert run.data.params["run.method"] == "lw" and run.data.params["model.task"] == "image-text"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.jsonl", "summary.json", "report.md", "plots"} <= logged
    assert client.list_artifacts(run.info.run_id, "plots")  # the run's PNGs


def test_a_resumed_run_replaces_the_rounds_it_redoes(emoji_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tracking = 'run.log_to=["tensorboard", "mlflow"]'
    cfg = fedmml.load_config("tiny", [f'data.root="{emoji_root}"', *ROUNDS, tracking])
    fedmml.run(cfg, run_dir)
    whole = _scalars(_read(run_dir / "tensorboard"), "train_loss")
    client, (first,) = _mlflow_runs(run_dir)
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
    # MLflow: one live run for the folder, holding each round once (the stopped run's is deleted).
    client, (resumed,) = _mlflow_runs(run_dir)
    assert resumed.info.run_id != first.info.run_id and resumed.info.status == "FINISHED"
    assert client.get_run(first.info.run_id).info.lifecycle_stage == "deleted"
    assert _history(client, resumed.info.run_id, "train_loss") == [
        (s, pytest.approx(v, rel=1e-6))
        for s, v in whole  # TensorBoard's are float32
    ]
    # --overwrite: the new run replaces the MLflow run and the TensorBoard log, not adds to them.
    fedmml.run(cfg, run_dir, overwrite=True)
    assert [s for s, _ in _scalars(_read(run_dir / "tensorboard"), "train_loss")] == [1, 2, 3]
    client, (again,) = _mlflow_runs(run_dir)
    assert [s for s, _ in _history(client, again.info.run_id, "train_loss")] == [1, 2, 3]


def test_a_comparison_logs_each_method_as_its_own_mlflow_run_in_one_store(
    emoji_root: Path, tmp_path: Path
) -> None:
    overrides = [f'data.root="{emoji_root}"', *ROUNDS, "schedules.uniform.rounds=[1, 0, 0]"]
    cfg = fedmml.load_config("tiny", [*overrides, 'run.log_to=["mlflow"]'])
    fedmml.compare(cfg, tmp_path / "cmp", methods=["e2e", "lw"])
    client, runs = _mlflow_runs(tmp_path / "cmp")
    assert sorted(r.info.run_name for r in runs) == ["e2e", "lw"]
    for run in runs:
        method = run.info.run_name
        assert run.data.params["run.method"] == method
        figures = json.loads((tmp_path / "cmp" / method / "summary.json").read_text())
        assert run.data.metrics["final/rsum"] == pytest.approx(figures["rsum"])
    assert not (tmp_path / "cmp" / "e2e" / "mlflow.db").exists()


def test_an_mlflow_store_that_cannot_be_opened_is_one_line(
    emoji_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fedmml.cli import main

    (tmp_path / "file").write_text("")
    store = f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}"  # a folder that is a file
    args = ["run", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "run")]
    for item in (f'data.root="{emoji_root}"', *ROUNDS, 'run.log_to=["mlflow"]', f'run.mlflow_uri="{store}"'):
        args += ["--set", item]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"fedmml: error: MLflow at {store}:" in err and "Traceback" not in err


def test_an_unknown_tracker_is_one_line() -> None:
    with pytest.raises(fedmml.ConfigError, match="run.log_to"):
        fedmml.load_config("tiny", {"run.log_to": ["wandb"]})
