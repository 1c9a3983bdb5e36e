"""fedmml: resource-efficient federated multimodal learning (FedMML, LW-FedMML, Prog-FedMML).

The public API (see :mod:`fedmml.api`): :func:`load_config`, :func:`run`, :func:`resume`, :func:`compare`,
:func:`evaluate`, the :class:`Config` they take, and the events (:mod:`fedmml.events`) a callback receives.
Everything else is private and may change.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "load_config",
    "run",
    "resume",
    "compare",
    "evaluate",
    "Config",
    "ConfigError",
    "Event",
    "Phase",
    "Notice",
    "MethodStarted",
    "StageStarted",
    "RoundStarted",
    "ClientStarted",
    "ClientDropped",
    "Backfill",
    "RoundSkipped",
    "RoundDone",
    "RunFinished",
]
_HOMES = {"fedmml.api": __all__[:5], "fedmml.config": __all__[5:7], "fedmml.events": __all__[7:]}


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import fedmml` (and the command's start) stays light.
    import importlib

    for module, names in _HOMES.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'fedmml' has no attribute {name!r}")
