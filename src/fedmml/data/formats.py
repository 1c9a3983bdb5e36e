"""Data formats: the on-disk shapes a dataset is read from in place (``data.format``), and the registry that
lets a user add their own.

A format reads one split's metadata into an index (a :class:`~fedmml.data.coco.CaptionIndex` for
image-text, an :class:`~fedmml.data.advance.AdvanceIndex` for image-audio) without decoding a sample: ids,
image files (relative to the index's ``images_path``), captions or classes, labels and identities, and the
malformed entries it passed over, counted by kind. Everything after that — the limit, the partition over
clients from metadata alone, each client decoding only its share through the image store, unreadable
files counted where they are found — is the same for every format.

Built in:

- ``coco``: fedmml's own layout, ``captions_<split>.json`` (COCO captions JSON) beside ``images/``;
- ``coco2017``: the official MS-COCO 2017 release, ``annotations/captions_{train,val}2017.json`` beside
  ``train2017/`` and ``val2017/``; ``train`` is train2017, ``test`` is val2017 (5,000 images);
- ``karpathy``: a Karpathy splits file (``dataset_coco.json``, ``dataset_flickr30k.json`` or
  ``dataset_flickr8k.json``) beside the images (``<filepath>/<filename>`` for COCO; ``<data.images_dir>/``,
  else ``flickr30k-images/`` or ``Flicker8k_Dataset/``, for Flickr); its ``train``, ``val`` and ``test``
  splits, ``restval`` joining ``train`` with ``data.restval = true``;
- ``hf``: a Hugging Face dataset on disk (``save_to_disk``'s folder, or Parquet files as the Hub lays them
  out), one row per image, its columns named by ``data.image_column``, ``data.caption_column`` and the like
  (see :mod:`fedmml.data.hf`);
- ``advance``: the ADVANCE image + sound layout, ``<split>/vision/<class>/`` and ``<split>/sound/<class>/``.

``data.format = "auto"`` takes the first format of the run's task whose files the folder holds.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmml.data import DataError
from fedmml.data.advance import read_advance_index
from fedmml.data.coco import CaptionIndex, read_caption_index
from fedmml.data.hf import data_files, hf_splits, hf_task, read_hf

if TYPE_CHECKING:
    from fedmml.config import Config


class FormatError(DataError):
    """A folder in no known format, or in one that does not fit the run's task."""


@dataclass(frozen=True)
class Format:
    """One on-disk shape: ``read(root, split, cfg)`` gives the whole split's index (nothing decoded),
    ``splits(root, cfg)`` the splits the folder holds, ``detect(root)`` whether a folder has its files."""

    name: str
    task: str  # "image-text" | "image-audio" | "any" (read looks at cfg.model.task)
    read: Callable[[Path, str, Config], Any]
    splits: Callable[[Path, Config], list[str]]
    detect: Callable[[Path], bool]
    describe: str = ""

    def task_of(self, root: Path) -> str:
        """The task the folder ``root`` holds data of (a format of either task looks at its files)."""
        return hf_task(root) if self.task == "any" else self.task


FORMATS: dict[str, Format] = {}


def register_format(
    name: str,
    task: str,
    read: Callable[[Path, str, Config], Any],
    splits: Callable[[Path, Config], list[str]],
    detect: Callable[[Path], bool] | None = None,
    describe: str = "",
) -> None:
    """Make ``data.format = name`` read a folder with ``read`` (see :class:`Format` and the module
    docstring for the contract); with ``detect``, ``data.format = "auto"`` finds it too (after the built-in
    formats). Registration lasts for the process: register in every process that opens data."""
    if task not in ("image-text", "image-audio", "any"):
        raise ValueError(f"task must be image-text, image-audio or any, not {task!r}")
    if name in globals().get("BUILT_IN", ()):
        raise ValueError(f"data format {name!r} is built in; register yours under another name")
    FORMATS[name] = Format(name, task, read, splits, detect or (lambda root: False), describe)


def format_of(cfg: Config, root: str | Path) -> Format:
    """The format ``data.format`` names, or the first of the run's task that the folder ``root`` holds."""
    task, wanted = cfg.model.task, cfg.data.format
    if wanted != "auto":
        if wanted not in FORMATS:
            raise FormatError(f"unknown data.format {wanted!r}; valid: auto, {', '.join(FORMATS)}")
        if FORMATS[wanted].task not in (task, "any"):
            raise FormatError(f"data.format {wanted!r} holds {FORMATS[wanted].task} data, the run is {task}")
        return FORMATS[wanted]
    root = Path(root)
    for fmt in FORMATS.values():
        if fmt.task in (task, "any") and root.is_dir() and fmt.detect(root):
            return fmt
    # Nothing found: the task's own layout, whose reader says what is missing.
    return next(fmt for fmt in FORMATS.values() if fmt.task == task)


def detect_format(root: Path) -> Format | None:
    """The first format, of either task, whose files the folder ``root`` holds."""
    return next((fmt for fmt in FORMATS.values() if root.is_dir() and fmt.detect(root)), None)


# coco: fedmml's own layout -------------------------------------------------------------------------------
def _coco_read(root: Path, split: str, cfg: Config) -> CaptionIndex:
    return read_caption_index(root, split, cfg.data.images_dir, identity_key=cfg.data.identity_key)


def _coco_splits(root: Path, cfg: Config) -> list[str]:
    return sorted(p.stem.removeprefix("captions_") for p in root.glob("captions_*.json"))


# coco2017: the official release ----------------------------------------------------------------------------
COCO2017_SPLITS = {"train": "train2017", "test": "val2017"}


def _coco2017_split(split: str) -> str:
    if split not in COCO2017_SPLITS:
        raise FormatError(
            f"MS-COCO 2017 has the splits {', '.join(COCO2017_SPLITS)} (train2017, val2017), not {split!r}; "
            'eval.split = "val" carves one out of train'
        )
    return COCO2017_SPLITS[split]


def _coco2017_read(root: Path, split: str, cfg: Config) -> CaptionIndex:
    name = _coco2017_split(split)
    captions = f"annotations/captions_{name}.json"
    return read_caption_index(root, name, name, captions_file=captions, identity_key=cfg.data.identity_key)


def _coco2017_splits(root: Path, cfg: Config) -> list[str]:
    annotations = root / "annotations"
    return [s for s, name in COCO2017_SPLITS.items() if (annotations / f"captions_{name}.json").is_file()]


# karpathy: the splits files of image-text retrieval ------------------------------------------------------
KARPATHY_FILES = ("dataset_coco.json", "dataset_flickr30k.json", "dataset_flickr8k.json")
FLICKR_IMAGES = ("flickr30k-images", "Flicker8k_Dataset", "Flickr8k_Dataset")


def _karpathy_file(root: Path) -> Path:
    found = next((root / f for f in KARPATHY_FILES if (root / f).is_file()), None)
    if found is None:
        raise FormatError(f"no Karpathy splits file ({', '.join(KARPATHY_FILES)}) in {root}")
    return found


@lru_cache(maxsize=1)
def _karpathy_entries(path: Path, mtime_ns: int) -> list[Any]:
    """The splits file's images (read once for all splits: COCO's is 140 MB), malformed ones counted."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot parse {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} is not a Karpathy splits file: expected an object with an 'images' list")
    return data["images"]


def _karpathy_read(root: Path, split: str, cfg: Config) -> CaptionIndex:
    path = _karpathy_file(root)
    entries = _karpathy_entries(path, path.stat().st_mtime_ns)
    wanted = {split, "restval"} if split == "train" and cfg.data.restval else {split}
    images = root
    if not any(isinstance(e, dict) and "filepath" in e for e in entries[:1]):
        # Flickr: every image in one folder.
        folders = (cfg.data.images_dir, *FLICKR_IMAGES)
        images = next((root / f for f in folders if (root / f).is_dir()), root / cfg.data.images_dir)
    skipped = Counter(bad_image_entry=0, bad_caption=0, image_without_caption=0, unreadable_image=0)
    index = CaptionIndex(path, images, [], [], [], [], {}, [], home=root)
    seen: set[Any] = set()
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("split") not in wanted:
            continue
        image_id = entry.get("cocoid", entry.get("imgid"))
        name = entry.get("filename")
        if image_id is None or not isinstance(name, str) or image_id in seen:
            skipped["bad_image_entry"] += 1
            continue
        seen.add(image_id)
        captions = []
        for sentence in entry.get("sentences") or []:
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if isinstance(raw, str) and raw.strip():
                captions.append(raw.strip())
            else:
                skipped["bad_caption"] += 1
        if not captions:
            skipped["image_without_caption"] += 1
            continue
        filepath = entry.get("filepath")
        index.image_ids.append(image_id)
        index.file_names.append(f"{filepath}/{name}" if isinstance(filepath, str) and filepath else name)
        index.captions.append(captions)
        index.labels.append(None)
        index.identities.append(f"id={image_id}")
    index.skipped = dict(skipped)
    if not index.image_ids:
        raise DataError(
            f"no usable image-caption pairs in split {split!r} of {path} (skipped: {index.skipped})"
        )
    return index


def _karpathy_splits(root: Path, cfg: Config) -> list[str]:
    path = _karpathy_file(root)
    entries = _karpathy_entries(path, path.stat().st_mtime_ns)
    found = {e.get("split") for e in entries if isinstance(e, dict)}
    return sorted(s for s in found if s in ("train", "val", "test"))


# advance: image + sound ---------------------------------------------------------------------------------
def _advance_read(root: Path, split: str, cfg: Config) -> Any:
    d = cfg.data
    classes = d.classes or None
    return read_advance_index(
        root, split, classes=classes, group_key=cfg.partition.group, identity_key=d.identity_key
    )


def _advance_splits(root: Path, cfg: Config) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "vision").is_dir() or (p / "sound").is_dir())


register_format(
    "coco",
    "image-text",
    _coco_read,
    _coco_splits,
    lambda root: any(root.glob("captions_*.json")),
    "COCO captions (captions_<split>.json beside images/)",
)
register_format(
    "coco2017",
    "image-text",
    _coco2017_read,
    _coco2017_splits,
    lambda root: bool(_coco2017_splits(root, None)),
    "MS-COCO 2017 (annotations/captions_{train,val}2017.json beside train2017/, val2017/)",
)
register_format(
    "karpathy",
    "image-text",
    _karpathy_read,
    _karpathy_splits,
    lambda root: any((root / f).is_file() for f in KARPATHY_FILES),
    "Karpathy splits (dataset_coco.json, dataset_flickr30k.json) beside the images",
)
register_format(
    "hf",
    "any",
    read_hf,
    hf_splits,
    lambda root: bool(data_files(root)),
    "Hugging Face dataset on disk (save_to_disk's folder, or <split>*.parquet files)",
)
register_format(
    "advance",
    "image-audio",
    _advance_read,
    _advance_splits,
    lambda root: any(root.glob("*/vision")) or any(root.glob("*/sound")),
    "ADVANCE (<split>/vision/<class>/, <split>/sound/<class>/)",
)
BUILT_IN = frozenset(FORMATS)
