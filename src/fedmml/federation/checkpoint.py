"""Atomic checkpoints: one safetensors file per round holding the global model and the server's JSON state.

A checkpoint is written to a temporary file, flushed to disk and renamed into place, so a crash at any
moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PATTERN = "round-*.safetensors"


class CheckpointDamaged(ValueError):
    """A checkpoint file that cannot be read back (truncated by a crash or a full disk, or altered)."""


def checkpoint_path(directory: Path, round_no: int) -> Path:
    """Where the checkpoint after ``round_no`` lives."""
    return directory / f"round-{round_no:06d}.safetensors"


def save_checkpoint(
    directory: Path, round_no: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2
) -> Path:
    """Write atomically, then keep only the newest ``keep`` checkpoints (0 keeps all)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, round_no)
    tmp = final.with_suffix(".tmp")
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"fedmml_state": json.dumps(state)},
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        last = latest_checkpoint(directory)
        kept = f"the last good checkpoint is {last}" if last else "no round has been checkpointed yet"
        raise OSError(
            f"cannot write the checkpoint of round {round_no} in {directory} ({err}); {kept}"
        ) from None
    os.replace(tmp, final)
    # The rename is only durable once the directory entry itself is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if keep > 0:
        for old in sorted(directory.glob(PATTERN))[:-keep]:
            old.unlink()
    return final


def checkpoints(directory: Path) -> list[Path]:
    """Every checkpoint file in ``directory``, newest first."""
    return sorted(directory.glob(PATTERN), reverse=True) if directory.is_dir() else []


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint file in ``directory``, if any."""
    found = checkpoints(directory)
    return found[0] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and server state of one checkpoint; :class:`CheckpointDamaged` if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()["fedmml_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as err:
        raise CheckpointDamaged(f"{path.name} cannot be read ({err})") from None
    return tensors, state
