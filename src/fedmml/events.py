"""What a run tells whoever watches it: the progress display, the run directory's metrics.jsonl, Flower's log.

Events are typed, so a listener matches on what happened instead of on strings, and a finished round carries
its task's own headline scores (rsum for retrieval, accuracy and macro-F1 for classification) as text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Phase:
    """A step of set-up or wind-down (building the model, loading data, evaluating, writing outputs)."""

    text: str


@dataclass(frozen=True)
class Notice:
    """Something the person running the command should know and keep in view (e.g. a damaged checkpoint
    passed over)."""

    text: str


@dataclass(frozen=True)
class MethodStarted:
    """A comparison moves on to the next method (and, over several seeds, names the seed)."""

    method: str
    seed: int | None = None


@dataclass(frozen=True)
class StageStarted:
    """The global model grew to a new stage."""

    stage: int
    stages: int
    rounds: int


@dataclass(frozen=True)
class RoundStarted:
    """A round (or a retry of it) sampled its clients."""

    round: int
    rounds: int
    clients: list[int]


@dataclass(frozen=True)
class ClientStarted:
    """An in-process client starts its local work."""

    client: int
    position: int
    of: int


@dataclass(frozen=True)
class ClientDropped:
    """A client left out: it failed its set-up, crashed, was late, or its update was rejected."""

    client: int
    reason: str


@dataclass(frozen=True)
class Backfill:
    """A round asks replacement clients for the ones it lost."""

    round: int
    clients: list[int]


@dataclass(frozen=True)
class RoundSkipped:
    """Too few valid updates arrived: the round changed nothing."""

    round: int
    accepted: int


@dataclass(frozen=True)
class RoundDone:
    """A finished round's record (one line of metrics.jsonl), with the task's scores as text if evaluated."""

    record: dict[str, Any] = field(hash=False)
    scores: str = ""


@dataclass(frozen=True)
class RunFinished:
    """A run wrote its outputs (model, summary.json, report.md, plots) into ``out_dir``."""

    summary: dict[str, Any] = field(hash=False)
    out_dir: str


Event = (
    Phase
    | Notice
    | MethodStarted
    | StageStarted
    | RoundStarted
    | ClientStarted
    | ClientDropped
    | Backfill
    | RoundSkipped
    | RoundDone
    | RunFinished
)
Listener = Callable[[Event], None]


def ignore(event: Event) -> None:
    """A listener that listens to nothing."""
