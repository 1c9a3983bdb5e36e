"""Experiment tracking (``run.log_to``): a run's figures in the tracker people already watch, beside
metrics.jsonl, which stays the record.

``"tensorboard"`` writes ``<run>/tensorboard``: every numeric figure of every round's record (train loss,
scores, bytes up and down, client memory and FLOPs, stage, ...) as a scalar at step = round, a dropped client
as text at its round, and once the run is done the config with the final figures (TensorBoard's HParams view,
so that ``tensorboard --logdir <compare out>`` lines the methods of a comparison up), the summary and the
report. A resumed run writes on after its checkpoint's round; the rounds it redoes replace the stopped run's.

``"mlflow"`` logs the same figures to an MLflow run (the optional extra: MLflow's tracking client with its
SQLite store). By default the database is ``<run>/mlflow.db`` with the artifacts beside it in
``<run>/mlflow-artifacts`` (``fedmml compare``: one database in the comparison's folder, each method its own
MLflow run, so that MLflow's UI sets them side by side); ``run.mlflow_uri`` names another store. The config is
the run's parameters, every numeric figure a metric at step = round, the summary's figures ``final/<key>``,
and config.json, metrics.jsonl, summary.json, report.md and the plots its artifacts. One run folder is one
MLflow run: a resumed or overwritten run replaces the MLflow run it had (deleted, MLflow's soft delete) by one
that holds each round once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedmml.cache import cache_dir
from fedmml.config import Config, ConfigError
from fedmml.events import ClientDropped, Event, Listener, RoundDone, RunFinished

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlflow-artifacts"
MLFLOW_RUN_ID = "mlflow-run-id"  # which MLflow run holds this folder's run: replaced on resume or overwrite
MLFLOW_EXPERIMENT = "fedmml"
ARTIFACTS = ("config.json", "metrics.jsonl", "summary.json", "report.md")


def track(
    cfg: Config, out_dir: Path, forward: Listener | None, history: Sequence[dict[str, Any]] = ()
) -> Listener | None:
    """``forward`` with the trackers of ``run.log_to`` in front of it (``forward`` itself when there are
    none); ``history`` is the records of the rounds a resumed run already has (its checkpoint's)."""
    listener = forward
    if "tensorboard" in cfg.run.log_to:
        listener = TensorBoardTracker(cfg, out_dir / TENSORBOARD_DIR, listener, len(history) + 1)
    if "mlflow" in cfg.run.log_to:
        listener = MLflowTracker(cfg, out_dir, listener, history)
    return listener


def mlflow_uri(folder: Path) -> str:
    """The tracking URI of an MLflow database in ``folder`` (the default of ``run.mlflow_uri``)."""
    return f"sqlite:///{(folder / MLFLOW_DB).resolve()}"


def numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a round's record by name, one level of nested tables as ``table/key``
    (per-client figures); lists (a confusion matrix, the sampled clients) and text are left to
    metrics.jsonl."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[prefix + key] = float(value)
        elif isinstance(value, dict) and not prefix:
            out.update(numbers(value, f"{key}/"))
    return out


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as dotted keys to scalars (what a tracker's parameter table takes)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            out[prefix + key] = value
        else:
            out[prefix + key] = json.dumps(value)
    return out


class TensorBoardTracker:
    """Writes the events it sees to a TensorBoard log folder, then forwards them."""

    def __init__(self, cfg: Config, folder: Path, forward: Listener | None, next_round: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "run.log_to = [\"tensorboard\"] needs TensorBoard: pip install 'fedmml[tracking]'"
            ) from None
        self.cfg = cfg
        self.forward = forward
        self.round = next_round
        # purge_step: the rounds a resumed run redoes replace those the stopped run had logged.
        self.writer = SummaryWriter(str(folder), purge_step=next_round if next_round > 1 else None)
        if next_round == 1:
            self.writer.add_text("config", f"```json\n{cfg.to_json()}\n```", 0)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RoundDone):
            self.round = int(event.record["round"])
            for key, value in numbers(event.record).items():
                self.writer.add_scalar(key, value, self.round)
            self.writer.flush()  # a round is visible in TensorBoard as soon as it is in metrics.jsonl
            self.round += 1
        elif isinstance(event, ClientDropped):
            self.writer.add_text("dropped", f"client {event.client}: {event.reason}", self.round)
        elif isinstance(event, RunFinished):
            self._finish(event)
        if self.forward is not None:
            self.forward(event)

    def _finish(self, event: RunFinished) -> None:
        final = {f"final/{k}": v for k, v in numbers(event.summary).items() if "/" not in k}
        self.writer.add_hparams(_flat(self.cfg.to_dict()), final, run_name="final")
        self.writer.add_text("summary", f"```json\n{json.dumps(event.summary, indent=1)}\n```", self.round)
        report = Path(event.out_dir) / "report.md"
        if report.is_file():
            self.writer.add_text("report", report.read_text(), self.round)
        self.writer.close()


class MLflowTracker:
    """Logs the events it sees to one MLflow run, then forwards them.

    MLflow's calls run in order on one thread of their own: importing MLflow takes seconds (1.8 s here, and
    a new database 1.8 s more before :func:`_new_store`), which so overlap the run's set-up instead of
    holding it up. An error there is raised at the next event, and the run's end waits for everything to be
    logged."""

    def __init__(
        self, cfg: Config, out_dir: Path, forward: Listener | None, history: Sequence[dict[str, Any]]
    ) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError("run.log_to = [\"mlflow\"] needs MLflow: pip install 'fedmml[tracking]'")
        self.forward = forward
        self.out_dir = out_dir
        self.last_round = int(history[-1]["round"]) if history else 0
        self.dropped: list[str] = []
        self.uri = cfg.run.mlflow_uri or mlflow_uri(out_dir)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="mlflow")
        self.pending: list[Future] = []
        self._submit(self._open, cfg, [(numbers(r), int(r["round"])) for r in history])

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._raise([f for f in self.pending if f.done()])
        self.pending.append(self.worker.submit(fn, *args))

    def _raise(self, done: list[Future]) -> None:
        """MLflow's error, if one of ``done`` failed, in the run's thread and in one line."""
        for future in done:
            self.pending.remove(future)
            try:
                future.result()
            except Exception as err:
                self.worker.shutdown(cancel_futures=True)
                lines = str(err).strip().splitlines() or [type(err).__name__]
                raise ConfigError(f"MLflow at {self.uri}: {lines[0]}") from err

    def _open(self, cfg: Config, history: list[tuple[dict[str, float], int]]) -> None:
        # fedmml's clients and servers often run offline: MLflow's usage reporting would only try the network.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # Creating the database prints Alembic's migrations line by line; the run's display is fedmml's.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        db = Path(self.uri.removeprefix("sqlite:///")) if self.uri.startswith("sqlite:///") else None
        if db is not None and not db.exists():
            _new_store(db)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        if found is not None:
            experiment = found.experiment_id
        else:
            # A SQLite store keeps its artifacts beside the database, not in the working directory (MLflow's
            # default for a database store).
            location = (db.parent / MLFLOW_ARTIFACTS).resolve().as_uri() if db is not None else None
            experiment = self.client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=location)
        self._replace_earlier_run()
        tags = {
            "fedmml.run_dir": str(self.out_dir.resolve()),
            "fedmml.method": cfg.run.method,
            "fedmml.preset": cfg.preset,
        }
        self.run_id = self.client.create_run(experiment, run_name=self.out_dir.name, tags=tags).info.run_id
        (self.out_dir / MLFLOW_RUN_ID).write_text(self.run_id)
        self._log(params=[Param(k, str(v)) for k, v in _flat(cfg.to_dict()).items()])
        for figures, step in history:
            self._round(figures, step)

    def _replace_earlier_run(self) -> None:
        from mlflow.exceptions import MlflowException

        path = self.out_dir / MLFLOW_RUN_ID
        if not path.is_file():
            return
        try:
            self.client.delete_run(path.read_text().strip())
        except MlflowException:
            pass  # it was logged elsewhere (another run.mlflow_uri) or deleted by hand: nothing to replace

    def _log(self, metrics: Sequence[Any] = (), params: Sequence[Any] = ()) -> None:
        """log_batch within MLflow's limits per call (1,000 metrics, 100 parameters)."""
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def _round(self, figures: dict[str, float], step: int) -> None:
        self._log(_metrics(figures, step))

    def __call__(self, event: Event) -> None:
        if isinstance(event, RoundDone):
            self.last_round = int(event.record["round"])
            self._submit(self._round, numbers(event.record), self.last_round)
        elif isinstance(event, ClientDropped):
            self.dropped.append(f"round {self.last_round + 1}: client {event.client}: {event.reason}")
        elif isinstance(event, RunFinished):
            top = numbers({k: v for k, v in event.summary.items() if not isinstance(v, dict)})
            final = {f"final/{k}": v for k, v in top.items()}
            self._submit(self._finish, final, self.last_round, Path(event.out_dir), list(self.dropped))
            self.worker.shutdown()
            self._raise(list(self.pending))
        if self.forward is not None:
            self.forward(event)

    def _finish(self, final: dict[str, float], step: int, out: Path, dropped: list[str]) -> None:
        self._round(final, step)
        for name in ARTIFACTS:
            if (out / name).is_file():
                self.client.log_artifact(self.run_id, str(out / name))
        for plot in sorted([*out.glob("plots/*.png"), *out.glob("*.png")]):
            self.client.log_artifact(self.run_id, str(plot), "plots")
        if dropped:
            self.client.log_text(self.run_id, "\n".join(dropped) + "\n", "dropped_clients.txt")
        self.client.set_terminated(self.run_id, "FINISHED")


def _new_store(db: Path) -> None:
    """An empty SQLite store at ``db``, copied from one made once per MLflow version in fedmml's cache:
    making one runs MLflow's schema migrations, about 1.8 s of CPU (2 % of a default run) each time."""
    import mlflow
    from mlflow.tracking import MlflowClient

    template = cache_dir(f"mlflow-{mlflow.__version__}.db")
    if not template.is_file():
        template.parent.mkdir(parents=True, exist_ok=True)
        made = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        MlflowClient(tracking_uri=f"sqlite:///{made}").search_experiments()  # creates it
        os.replace(made, template)  # whole or not at all, whoever makes it at the same time
    shutil.copyfile(template, db)


def _metric_name(key: str) -> str:
    """``key`` in the characters MLflow allows in a metric's name."""
    return re.sub(r"[^\w./\- :]", "_", key)


def _metrics(figures: dict[str, float], step: int) -> list[Any]:
    """``figures`` as MLflow metrics at ``step``, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(_metric_name(key), value, now, step) for key, value in figures.items()]
