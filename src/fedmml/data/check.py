"""``fedmml data check DIR``: what a folder holds as fedmml reads it, before a run finds out.

The format found (or named), every split's size, captions per image (image-text) or classes (image-audio),
the entries the format's reader passed over, the files its index names that are missing (and, with
``decode``, those that do not decode), and what a run of the given config would train and score on.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from fedmml.data import DataError
from fedmml.data.advance import AdvanceIndex
from fedmml.data.formats import format_of
from fedmml.data.partition import carve
from fedmml.data.store import FileSources

EXAMPLES = 3  # missing or unreadable files named per split


def _files(index: Any) -> list[tuple[Any, str]]:
    """A split's files as (where they are read from, their name there)."""
    if not isinstance(index, AdvanceIndex):
        sources = index.images()
        return [(sources, name) for name in index.file_names]
    if index.sources is not None:  # rows of a Hugging Face dataset
        return [
            (where, name)
            for *_, image, sound in index.pairs
            for where, name in ((index.sources, image), (index.sounds, sound))
        ]
    files = FileSources(index.split_dir)
    return [
        (files, str(path.relative_to(index.split_dir)))
        for *_, image, sound in index.pairs
        for path in (image, sound)
    ]


def check_split(index: Any, decode: bool = False) -> dict[str, Any]:
    """Size, per-sample figures, skipped entries and missing (or, with ``decode``, undecodable) files of one
    split's index."""
    out: dict[str, Any] = {"samples": len(index), "skipped": {k: v for k, v in index.skipped.items() if v}}
    if isinstance(index, AdvanceIndex):
        out["classes"] = len(set(index.label_names))
    else:
        counts = [len(c) for c in index.captions]
        out["captions_per_image"] = {
            "min": min(counts),
            "mean": round(statistics.fmean(counts), 2),
            "max": max(counts),
        }
    files = _files(index)
    missing = [(where, name) for where, name in files if where.key(name) is None]
    out["missing_files"] = len(missing)
    out["missing_examples"] = [str(where.root / name) for where, name in missing[:EXAMPLES]]
    if decode:
        absent = set(missing)
        bad = [
            (where, name) for where, name in files if (where, name) not in absent and not where.verify(name)
        ]
        out["undecodable_files"] = len(bad)
        out["undecodable_examples"] = [str(where.root / name) for where, name in bad[:EXAMPLES]]
    return out


def check_folder(cfg: Any, root: Path, decode: bool = False) -> dict[str, Any]:
    """The report of the folder ``root`` read as ``cfg`` would read it (its ``data.format``, limits and
    evaluation split); a split that cannot be read is reported with why, not raised."""
    fmt = format_of(cfg, root)
    report: dict[str, Any] = {
        "folder": str(root),
        "format": fmt.name,
        "layout": fmt.describe,
        "task": cfg.model.task if fmt.task == "any" else fmt.task,
    }
    try:
        names = fmt.splits(root, cfg)
    except (OSError, DataError) as err:
        return report | {"error": str(err)}
    splits: dict[str, Any] = {}
    indexes: dict[str, Any] = {}
    for split in names:
        try:
            indexes[split] = fmt.read(root, split, cfg)
        except (OSError, DataError) as err:
            splits[split] = {"error": str(err)}
            continue
        splits[split] = check_split(indexes[split], decode)
    report["splits"] = splits
    report["run"] = _what_a_run_uses(cfg, indexes)
    return report


def _what_a_run_uses(cfg: Any, indexes: dict[str, Any]) -> dict[str, Any]:
    """Which split a run trains and scores on, and how many samples each gives it (before the clients'
    unreadable files)."""
    d = cfg.data
    train = indexes.get(d.train_split)
    uses: dict[str, Any] = {"train_split": d.train_split if train is not None else "(missing)"}
    carved = 0
    if cfg.eval.split == "val" and d.val_split not in indexes and train is not None:
        held = carved = len(carve(train.identities, d.val_fraction))  # positions of the carved samples
        uses["eval_split"] = f"carved out of {d.train_split} (data.val_fraction = {d.val_fraction})"
    else:
        held_split = d.val_split if cfg.eval.split == "val" else d.test_split
        held = len(indexes[held_split]) if held_split in indexes else 0
        uses["eval_split"] = held_split if held_split in indexes else f"{held_split} (missing)"
    if train is not None:
        available = len(train) - carved
        uses["train_samples"] = min(available, d.limit_train) if d.limit_train else available
    uses["eval_samples"] = min(held, d.limit_test) if d.limit_test else held
    return uses
