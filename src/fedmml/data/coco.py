"""Image-caption datasets in the COCO captions layout (root/images/ + root/captions_<split>.json)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmml.data import DataError
from fedmml.data.images import UnreadableImage, fit_for_storage, load_image, random_resized_crop, to_tensor

PREPARE_HINT = "run `fedmml data prepare emoji` (or point data.root at a COCO-format folder)"


class DatasetNotFound(FileNotFoundError):
    """A dataset root, image folder or captions file that does not exist."""


def _missing(what: str, path: Path) -> DatasetNotFound:
    return DatasetNotFound(f"{what} not found: {path}; {PREPARE_HINT}")


def _sort_key(image_id: Any) -> tuple[bool, Any]:
    # Ids are ints in COCO, but tolerate strings without mixing types in one comparison.
    return (isinstance(image_id, str), image_id)


def _valid_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value != ""
    )


def collate_train(batch: list[tuple[torch.Tensor, str]]) -> dict[str, Any]:
    """A training batch: stacked pixels as ``"image"``, the captions (a list of strings) as ``"text"``."""
    pixels, captions = zip(*batch, strict=True)
    return {"image": torch.stack(pixels), "text": list(captions)}


class CaptionDataset(Dataset):
    """Images with one or more captions each, preloaded into memory as uint8 arrays."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        images_dir: str = "images",
        image_size: int = 64,
        train: bool = True,
        augment: bool = False,
        seed: int = 0,
        limit: int = 0,
        captions_file: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.train = train
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        if not self.root.is_dir():
            raise _missing("dataset root", self.root)
        self.captions_path = self.root / (captions_file or f"captions_{split}.json")
        if not self.captions_path.is_file():
            raise _missing(f"captions file for split {split!r}", self.captions_path)
        self.images_path = self.root / images_dir
        if not self.images_path.is_dir():
            raise _missing("image folder", self.images_path)

        records, captions, skipped = _parse_captions(self.captions_path)
        self.image_ids: list[Any] = []
        self.file_names: list[str] = []
        self.captions: list[list[str]] = []
        self.labels: list[str | None] = []
        self.images: list[np.ndarray] = []
        for image_id in sorted(records, key=_sort_key):
            if limit > 0 and len(self.image_ids) >= limit:
                break
            if not captions.get(image_id):
                skipped["image_without_caption"] += 1
                continue
            record = records[image_id]
            try:
                pixels = load_image(self.images_path / record["file_name"])
            except UnreadableImage:
                skipped["unreadable_image"] += 1
                continue
            self.images.append(fit_for_storage(pixels, self.image_size, self.augment))
            self.image_ids.append(image_id)
            self.file_names.append(record["file_name"])
            self.captions.append(captions[image_id])
            category = record.get("category")
            self.labels.append(category if isinstance(category, str) else None)
        self.skipped: dict[str, int] = dict(skipped)
        if not self.images:
            raise DataError(
                f"no usable image-caption pairs in {self.captions_path} (skipped: {self.skipped})"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose seeded caption draws and augmentations __getitem__ returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | tuple[torch.Tensor, list[str]]:
        if not self.train:
            return to_tensor(self.images[index], self.image_size), list(self.captions[index])
        return self._draw(index, self.epoch)

    def _draw(self, index: int, epoch: int) -> tuple[torch.Tensor, str]:
        """The training sample ``index`` presents in ``epoch``."""
        pixels = self.images[index]
        # Seeded by (seed, epoch, index) so draws do not depend on access order or DataLoader workers.
        rng = np.random.default_rng([self.seed, epoch, index])
        options = self.captions[index]
        caption = options[int(rng.integers(len(options)))]
        if self.augment:
            pixels = random_resized_crop(pixels, self.image_size, rng=rng)
        return to_tensor(pixels, self.image_size), caption

    collate = staticmethod(collate_train)

    def variants(self, index: int, views: int = 1) -> dict[str, list[Any]]:
        """The inputs sample ``index`` presents in training, per modality: every distinct caption, and one
        image, or with augmentation the ``views`` crops of epochs 0..views-1."""
        if self.augment:
            images = [self._draw(index, epoch)[0] for epoch in range(views)]
        else:
            images = [to_tensor(self.images[index], self.image_size)]
        return {"image": images, "text": list(dict.fromkeys(self.captions[index]))}

    @property
    def num_captions(self) -> int:
        """Total number of valid captions across all kept images."""
        return sum(len(c) for c in self.captions)


def _parse_captions(path: Path) -> tuple[dict[Any, dict], dict[Any, list[str]], Counter]:
    """Read a COCO captions JSON into id->image record and id->captions, counting malformed entries."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot parse captions file {path}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path} is not a COCO captions file: expected an object with an 'images' list")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(f"{path}: 'annotations' must be a list")

    skipped: Counter = Counter(bad_image_entry=0, bad_caption=0, unreadable_image=0, image_without_caption=0)
    records: dict[Any, dict] = {}
    for entry in data["images"]:
        ok = (
            isinstance(entry, dict) and _valid_id(entry.get("id")) and isinstance(entry.get("file_name"), str)
        )
        if not ok or entry["id"] in records:
            skipped["bad_image_entry"] += 1
            continue
        records[entry["id"]] = entry

    captions: dict[Any, list[str]] = {}
    for ann in annotations:
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        caption = ann.get("caption") if isinstance(ann, dict) else None
        known = _valid_id(image_id) and image_id in records
        if not known or not isinstance(caption, str) or not caption.strip():
            skipped["bad_caption"] += 1
            continue
        captions.setdefault(image_id, []).append(caption.strip())
    return records, captions, skipped
