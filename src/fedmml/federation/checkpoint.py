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
from safetensors import safe_open
from safetensors.torch import save_file

PATTERN = "round-*.safetensors"


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
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(tmp),
        metadata={"fedmml_state": json.dumps(state)},
    )
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
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


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, if any."""
    found = sorted(directory.glob(PATTERN)) if directory.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and server state of one checkpoint."""
    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["fedmml_state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, state
