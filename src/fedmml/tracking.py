"""Experiment tracking (``run.log_to``): a run's figures in the tracker people already watch, beside
metrics.jsonl, which stays the record.

``"tensorboard"`` writes ``<run>/tensorboard``: every numeric figure of every round's record (train loss,
scores, bytes up and down, client memory and FLOPs, stage, ...) as a scalar at step = round, a dropped client
as text at its round, and once the run is done the config with the final figures (TensorBoard's HParams view,
so that ``tensorboard --logdir <compare out>`` lines the methods of a comparison up), the summary and the
report. A resumed run writes on after its checkpoint's round; the rounds it redoes replace the stopped run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedmml.config import Config, ConfigError
from fedmml.events import ClientDropped, Event, Listener, RoundDone, RunFinished

TENSORBOARD_DIR = "tensorboard"


def track(cfg: Config, out_dir: Path, forward: Listener | None, next_round: int = 1) -> Listener | None:
    """``forward`` with the trackers of ``run.log_to`` in front of it (``forward`` itself when there are
    none); ``next_round`` is the first round this process runs (after a resume, the checkpoint's + 1)."""
    if "tensorboard" not in cfg.run.log_to:
        return forward
    return TensorBoardTracker(cfg, out_dir / TENSORBOARD_DIR, forward, next_round)


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
