"""Image-caption datasets in the COCO captions layout (root/images/ + root/captions_<split>.json)."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmml.data import DataError, fingerprint, sample_identity
from fedmml.data.images import random_resized_crop, to_tensor
from fedmml.data.partition import stratified_subset
from fedmml.data.store import (
    FileSources,
    Geometry,
    ImagesConfig,
    ImageStore,
    SourceImages,
    open_images,
    read_or_next,
)

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


def collate_train(batch: list[tuple[torch.Tensor | None, str]]) -> dict[str, Any]:
    """A training batch: stacked pixels as ``"image"`` (a list of None when they were not read), the
    captions (a list of strings) as ``"text"``."""
    pixels, captions = zip(*batch, strict=True)
    return {"image": stack_read(pixels), "text": list(captions)}


def stack_read(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | list[None]:
    """A batch of one modality's tensors, or the Nones of samples whose input was not read (see
    ``take``'s ``skip``)."""
    return list(tensors) if tensors[0] is None else torch.stack(list(tensors))


def sample_seed(seed: int, epoch: int, key: int | str) -> np.random.Generator:
    """The generator of one sample's draws in one epoch, keyed by the sample's own id: a sample presents the
    same caption and crop whichever dataset, share or folder it is read from, in whatever order."""
    ident = key if isinstance(key, int) and key >= 0 else zlib.crc32(str(key).encode("utf-8")) + 2**32
    return np.random.default_rng([seed, epoch, ident])


@dataclass
class CaptionIndex:
    """One split as metadata only, read from its captions file (see :mod:`fedmml.data.formats`): ids, files
    (relative to ``images_path``), captions and labels. No image is opened, so partitions over a split of
    any size cost no decoding."""

    captions_path: Path
    images_path: Path
    image_ids: list[Any]
    file_names: list[str]
    captions: list[list[str]]
    labels: list[str | None]
    skipped: dict[str, int]
    identities: list[str] = field(default_factory=list)  # see read_caption_index's identity_key
    # Where the image store lives (``<home>/.fedmml-store``); None: the folder above ``images_path``.
    home: Path | None = None
    # What file_names name (see fedmml.data.store.FileSources); None: files under images_path.
    sources: Any = None

    def images(self) -> Any:
        """Where this split's images are read from."""
        return self.sources if self.sources is not None else FileSources(self.images_path)

    def open_images(
        self, positions: Sequence[int], geometry: Geometry, images: ImagesConfig | None
    ) -> ImageStore | SourceImages:
        """What the samples at ``positions`` read their pixels from (see :func:`open_images`)."""
        names = [self.file_names[i] for i in positions]
        return open_images(self.images(), names, geometry, images, home=self.home)

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, positions: Sequence[int]) -> CaptionIndex:
        """The same split restricted to ``positions`` (in the order given); skip counts unchanged."""
        columns = (self.image_ids, self.file_names, self.captions, self.labels)
        picked = ([column[i] for i in positions] for column in columns)
        identities = [self.identities[i] for i in positions]
        return CaptionIndex(
            self.captions_path,
            self.images_path,
            *picked,
            dict(self.skipped),
            identities,
            self.home,
            self.sources,
        )


def read_caption_index(
    root: str | Path,
    split: str,
    images_dir: str = "images",
    limit: int = 0,
    captions_file: str | None = None,
    limit_seed: int = 0,
    identity_key: str = "",
) -> CaptionIndex:
    """The index of ``split`` under ``root``; with ``limit`` > 0 a subset of that many captioned images drawn
    with ``limit_seed``, each category keeping its share (see :func:`stratified_subset`). An image's identity
    is its record's ``identity_key`` field when it has one, else its own id."""
    root = Path(root)
    if not root.is_dir():
        raise _missing("dataset root", root)
    captions_path = root / (captions_file or f"captions_{split}.json")
    if not captions_path.is_file():
        raise _missing(f"captions file for split {split!r}", captions_path)
    images_path = root / images_dir
    if not images_path.is_dir():
        raise _missing("image folder", images_path)
    records, captions, skipped = _parse_captions(captions_path)
    index = CaptionIndex(captions_path, images_path, [], [], [], [], {})
    for image_id in sorted(records, key=_sort_key):
        if not captions.get(image_id):
            skipped["image_without_caption"] += 1
            continue
        record = records[image_id]
        index.image_ids.append(image_id)
        index.file_names.append(record["file_name"])
        index.captions.append(captions[image_id])
        category = record.get("category")
        index.labels.append(category if isinstance(category, str) else None)
        identity = record.get(identity_key) if identity_key else None
        index.identities.append(sample_identity(identity_key, identity, image_id))
    index.skipped = dict(skipped)
    keep = stratified_subset(index.labels, limit, limit_seed)
    if len(keep) < len(index):
        index = index.subset(keep)
    if not index.image_ids:
        raise DataError(f"no usable image-caption pairs in {captions_path} (skipped: {index.skipped})")
    return index


class CaptionDataset(Dataset):
    """Images with one or more captions each; pixels are read on access (see :mod:`fedmml.data.store`),
    so memory holds the captions and ids only, whatever the split's size.

    Only the images at ``positions`` of the split's index are used (all of them when None): a client
    prepares and reads its own share and nothing else. ``skipped`` counts the index's malformed entries when
    the whole split is used, and only the share's unreadable images otherwise.
    """

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
        limit_seed: int = 0,
        positions: Sequence[int] | None = None,
        index: CaptionIndex | None = None,
        images: ImagesConfig | None = None,
    ) -> None:
        self.split = split
        self.image_size = image_size
        self.train = train
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        if index is None:
            index = read_caption_index(root, split, images_dir, limit, captions_file, limit_seed)
        self.captions_path = index.captions_path
        self.images_path = index.images_path
        whole = positions is None
        chosen = range(len(index)) if whole else sorted(positions)
        source = index.open_images(chosen, Geometry(image_size, augment), images)
        skipped = Counter(index.skipped) if whole else Counter(unreadable_image=0)
        kept = [i for i in chosen if source.unreadable(index.file_names[i]) is None]
        skipped["unreadable_image"] += len(chosen) - len(kept)
        self.images = source
        self.image_ids: list[Any] = [index.image_ids[i] for i in kept]
        self.file_names: list[str] = [index.file_names[i] for i in kept]
        self.captions: list[list[str]] = [index.captions[i] for i in kept]
        self.labels: list[str | None] = [index.labels[i] for i in kept]
        self.skipped: dict[str, int] = dict(skipped)
        if not self.image_ids:
            raise DataError(
                f"no usable image-caption pairs in {self.captions_path} (skipped: {self.skipped})"
            )

    def fingerprint(self) -> str:
        """Which samples these are: ids, files, captions and categories (:func:`fedmml.data.fingerprint`)."""
        return fingerprint(self.image_ids, self.file_names, self.captions, self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose seeded caption draws and augmentations __getitem__ returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | tuple[torch.Tensor, list[str]]:
        if not self.train:
            return to_tensor(self.images.read(self.file_names[index]), self.image_size), list(
                self.captions[index]
            )
        return self._draw(index, self.epoch, self.images.read(self.file_names[index]))

    def take(
        self, index: int, epoch: int, skip: Collection[str] = ()
    ) -> tuple[tuple[torch.Tensor | None, str], int]:
        """The training sample ``index`` presents in ``epoch``, and how many unreadable images were passed
        over for it: an image that fails to read is replaced by the next readable sample. With ``"image"``
        in ``skip`` the image is not read (None; a cache holds what training needs of it)."""
        if "image" in skip:
            return self._draw(index, epoch, None), 0
        position, pixels, missed = read_or_next(self.images, self.file_names, index)
        return self._draw(position, epoch, pixels), missed

    def _draw(self, index: int, epoch: int, pixels: np.ndarray | None) -> tuple[torch.Tensor | None, str]:
        """The training sample ``index`` (its ``pixels`` read, or None) presents in ``epoch``."""
        # Seeded by (seed, epoch, image id) so draws depend neither on access order, DataLoader workers, nor
        # on which share or folder holds the image. The caption is drawn first: reading no pixels leaves it.
        rng = sample_seed(self.seed, epoch, self.image_ids[index])
        options = self.captions[index]
        caption = options[int(rng.integers(len(options)))]
        if pixels is None:
            return None, caption
        if self.augment:
            pixels = random_resized_crop(pixels, self.image_size, rng=rng)
        return to_tensor(pixels, self.image_size), caption

    collate = staticmethod(collate_train)

    def variants(self, index: int, views: int = 1) -> dict[str, list[Any]]:
        """The inputs sample ``index`` presents in training, per modality: every distinct caption, and one
        image, or with augmentation the ``views`` crops of epochs 0..views-1."""
        pixels = self.images.read(self.file_names[index])
        if self.augment:
            images = [self._draw(index, epoch, pixels)[0] for epoch in range(views)]
        else:
            images = [to_tensor(pixels, self.image_size)]
        return {"image": images, "text": list(dict.fromkeys(self.captions[index]))}

    @property
    def pixels(self) -> EvalPixels:
        """Every image as evaluation takes it, read when indexed (a split never sits in memory whole)."""
        return EvalPixels(self)

    @property
    def num_captions(self) -> int:
        """Total number of valid captions across all kept images."""
        return sum(len(c) for c in self.captions)


class EvalPixels(Sequence):
    """A dataset's evaluation images by index, each read on access."""

    def __init__(self, dataset: CaptionDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return self.dataset[index][0]


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

    skipped: Counter = Counter(
        bad_image_entry=0, bad_caption=0, caption_without_image=0, unreadable_image=0, image_without_caption=0
    )
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
        if not isinstance(caption, str) or not caption.strip():
            skipped["bad_caption"] += 1
            continue
        if not (_valid_id(image_id) and image_id in records):
            # A caption of an image the file does not list (or lists malformed): not a bad caption, and
            # counted once, whatever else the same edit left uncaptioned.
            skipped["caption_without_image"] += 1
            continue
        captions.setdefault(image_id, []).append(caption.strip())
    return records, captions, skipped
