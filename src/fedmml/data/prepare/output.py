"""What every dataset builder shares: its error type, JSON files, and writing the output folder safely."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path


class PrepareError(RuntimeError):
    """Fetching, reading or converting a dataset's source packages failed; the message says how to fix it."""


def dump_json(obj: object) -> bytes:
    """Deterministic, human-readable JSON bytes (so rebuilding gives byte-identical files)."""
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _owned(out_dir: Path, dataset: str) -> bool:
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    if not any(out_dir.iterdir()):
        return True
    try:
        info = json.loads((out_dir / "prepare.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("dataset") == dataset


def check_owned(out_dir: Path, dataset: str) -> None:
    """Refuse to replace a folder that is neither empty nor an earlier build of ``dataset``."""
    if not _owned(out_dir, dataset):
        raise PrepareError(
            f"{out_dir} exists and is not an earlier `fedmml data prepare {dataset}` output; "
            "choose another folder"
        )


def staging_dir(out_dir: Path) -> Path:
    """Where a build is written before it is swapped into place."""
    return out_dir.with_name(f".{out_dir.name}.partial")


def swap_in(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the finished build, so an interrupted build never looks complete."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def stored_stats(out_dir: Path, config: dict, listed_files: Callable[[Path], Iterable[Path]]) -> dict | None:
    """The stats of an earlier build with this ``config`` whose listed files all exist, else None."""
    try:
        info = json.loads((out_dir / "prepare.json").read_text(encoding="utf-8"))
        if info.get("config") != config or not all(f.is_file() for f in listed_files(out_dir)):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a missing or damaged build is simply rebuilt
    return info.get("stats")
