"""Image + audio classification data in the ADVANCE layout: root/<split>/{vision,sound}/<class>/<id>.*"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmml.data import DataError, fingerprint, sample_identity
from fedmml.data.audio import DEFAULT_FBANK, FeatureSettings, UnreadableAudio, load_fbank, pad_frames
from fedmml.data.coco import DatasetNotFound, sample_seed, stack_read
from fedmml.data.images import random_resized_crop, to_tensor
from fedmml.data.partition import stratified_subset
from fedmml.data.store import (
    Geometry,
    ImagesConfig,
    ImageStore,
    SourceImages,
    open_images,
    read_or_next,
)

PREPARE_HINT = (
    "run `fedmml data prepare tuxpaint --out <root>` (or point data.root at an ADVANCE-layout folder)"
)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
SOUND_EXTS = (".wav", ".ogg", ".flac")

Progress = Callable[[str], None]


def _files(folder: Path, exts: tuple[str, ...], skipped: Counter) -> dict[str, Path]:
    """id -> file for the files of one class folder; a second file with the same id is counted, not used."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    # Sorted by extension preference, then name, so the pick is deterministic.
    entries = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts),
        key=lambda p: (exts.index(p.suffix.lower()), p.name),
    )
    for path in entries:
        if path.stem in found:
            skipped["duplicate_id"] += 1
        else:
            found[path.stem] = path
    return found


def _class_names(folder: Path) -> list[str]:
    return (
        sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if folder.is_dir()
        else []
    )


def read_classes(root: str | Path, split: str = "train") -> list[str]:
    """Sorted class folder names of one split (vision and sound)."""
    folder = Path(root) / split
    return sorted(set(_class_names(folder / "vision")) | set(_class_names(folder / "sound")))


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot parse {path}: {err}") from err
    if not isinstance(meta, dict):
        raise DataError(f"{path} must map sample id -> {{'language': ...}}")
    return meta


class FbankCache:
    """Unpadded feature frames on disk, one .npy per clip, keyed by the feature settings and the file stat."""

    def __init__(self, folder: Path | None, settings: FeatureSettings) -> None:
        self.settings = settings
        self.folder = folder / f"fbank-{settings.key()}" if folder is not None else None
        self.hits = 0
        self.misses = 0

    def _entry(self, path: Path | str, sources: Any) -> Path | None:
        if self.folder is None:
            return None
        if sources is None:
            stat = path.stat()
            # Size and mtime in the key, so a replaced clip is featurised again instead of served stale.
            name = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        else:
            name = f"{sources.root.resolve()}|{path}|{sources.key(path)}"
        return self.folder / f"{hashlib.sha256(name.encode('utf-8')).hexdigest()[:24]}.npy"

    def load(self, path: Path | str, sources: Any = None) -> np.ndarray:
        """The clip's unpadded frames [n <= max_frames, mel], from the cache or computed and stored; ``path``
        is a file, or with ``sources`` (:class:`fedmml.data.hf.TableSources`) a clip's name there."""
        entry = self._entry(path, sources)
        if entry is not None and entry.is_file():
            try:
                features = np.load(entry)
                self.hits += 1
                return features
            except (OSError, ValueError):
                pass  # a damaged cache file is recomputed below
        if sources is None:
            features = load_fbank(path, self.settings, pad=False)
        else:
            features = load_fbank(io.BytesIO(sources.encoded(path)), self.settings, pad=False, name=str(path))
        self.misses += 1
        if entry is not None:
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                tmp = entry.with_suffix(f".{os.getpid()}.tmp")
                with open(tmp, "wb") as handle:
                    np.save(handle, features)
                os.replace(tmp, entry)  # atomic, so a concurrent or interrupted run never sees half a file
            except OSError:
                self.folder = None  # read-only dataset root: keep working, just without a cache
        return features


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """A batch: pixels [B,3,S,S] as ``"image"``, fbanks [B,frames,mel] as ``"audio"``, ``"labels"`` [B]."""
    pixels, fbanks, labels = zip(*batch, strict=True)
    return {
        "image": stack_read(pixels),
        "audio": stack_read(fbanks),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


@dataclass
class AdvanceIndex:
    """One split as metadata only: its (class, id, image file, sound file) pairs in class then id order, each
    sample's group from ``meta.json``, and the broken pairs counted. No file is decoded.

    With ``sources`` and ``sounds`` (a Hugging Face dataset, :mod:`fedmml.data.hf`) a pair's image and sound
    are names in them instead of files."""

    split_dir: Path
    classes: list[str]
    pairs: list[tuple[str, str, Any, Any]]
    groups: list[str | None]
    skipped: dict[str, int]
    identities: list[str] = field(default_factory=list)  # see read_advance_index's identity_key
    sources: Any = None
    sounds: Any = None

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, positions: Sequence[int]) -> AdvanceIndex:
        """The same split restricted to ``positions`` (in the order given); skip counts unchanged."""
        pick = [self.pairs[i] for i in positions], [self.groups[i] for i in positions]
        identities = [self.identities[i] for i in positions]
        return AdvanceIndex(
            self.split_dir, self.classes, *pick, dict(self.skipped), identities, self.sources, self.sounds
        )

    def open_images(
        self, positions: Sequence[int], root: Path, geometry: Geometry, images: ImagesConfig | None
    ) -> tuple[ImageStore | SourceImages, list[Any]]:
        """What the pairs at ``positions`` read their pixels from (see :func:`open_images`; the split lies
        under ``root``), and their images' names in it."""
        tables = self.sources is not None
        # Files by their path under the root (a store entry is then the same wherever the root moves).
        names = [self.pairs[i][2] if tables else str(self.pairs[i][2].relative_to(root)) for i in positions]
        return open_images(self.sources if tables else root, names, geometry, images, home=root), names

    @property
    def label_names(self) -> list[str]:
        """The class name of every pair (what a per-class Dirichlet split is over)."""
        return [name for name, _, _, _ in self.pairs]


def read_advance_index(
    root: str | Path,
    split: str,
    classes: Sequence[str] | None = None,
    limit: int = 0,
    group_key: str = "language",
    limit_seed: int = 0,
    identity_key: str = "",
) -> AdvanceIndex:
    """The index of ``split`` under ``root``; classes default to the train split's class folders. With
    ``limit`` > 0 a subset of that many pairs drawn with ``limit_seed``, each class keeping its share. A
    sample's identity is its ``meta.json`` entry's ``identity_key`` field when it has one, else its id."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFound(f"dataset root not found: {root}; {PREPARE_HINT}")
    split_dir = root / split
    if not (split_dir / "vision").is_dir() and not (split_dir / "sound").is_dir():
        raise DatasetNotFound(
            f"split {split!r} not found: no vision/ or sound/ in {split_dir}; {PREPARE_HINT}"
        )
    names = list(classes) if classes is not None else read_classes(root)
    folders = set(_class_names(split_dir / "vision")) | set(_class_names(split_dir / "sound"))
    # No train split (e.g. a test-only folder): fall back to this split's own class folders.
    names = names or sorted(folders)
    skipped: Counter = Counter(missing_image=0, missing_sound=0, unknown_class=0, duplicate_id=0)
    pairs: list[tuple[str, str, Path, Path]] = []
    for name in sorted(folders):
        images = _files(split_dir / "vision" / name, IMAGE_EXTS, skipped)
        sounds = _files(split_dir / "sound" / name, SOUND_EXTS, skipped)
        if name not in names:
            skipped["unknown_class"] += len(images.keys() | sounds.keys())
            continue
        skipped["missing_sound"] += len(images.keys() - sounds.keys())
        skipped["missing_image"] += len(sounds.keys() - images.keys())
        pairs += [(name, i, images[i], sounds[i]) for i in sorted(images.keys() & sounds.keys())]
    pairs = [pairs[i] for i in stratified_subset([name for name, _, _, _ in pairs], limit, limit_seed)]
    if not pairs:
        raise DataError(f"no usable image-sound pairs in {split_dir} (skipped: {dict(skipped)})")
    meta = _read_meta(split_dir / "meta.json")
    groups, identities = [], []
    for _, sample_id, _, _ in pairs:
        entry = meta.get(sample_id) if isinstance(meta.get(sample_id), dict) else {}
        group = entry.get(group_key)
        groups.append(group if isinstance(group, str) else None)
        identity = entry.get(identity_key) if identity_key else None
        identities.append(sample_identity(identity_key, identity, sample_id))
    return AdvanceIndex(split_dir, names, pairs, groups, dict(skipped), identities)


class AdvanceDataset(Dataset):
    """(image [3,S,S], fbank [frames, mel], label) triples read on access (images from the store of
    :mod:`fedmml.data.store`, frames from the feature cache); broken pairs are counted, not fatal.

    Only the pairs at ``positions`` of the split's index are used (all of them when None): a client prepares
    and reads its own share and nothing else. ``skipped`` counts the index's broken pairs when the whole
    split is loaded, and only the share's unreadable files otherwise.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int = 64,
        settings: FeatureSettings = DEFAULT_FBANK,
        classes: Sequence[str] | None = None,
        train: bool = False,
        augment: bool = False,
        seed: int = 0,
        limit: int = 0,
        cache_dir: str | Path | None = None,
        cache: bool = True,
        group_key: str = "language",
        limit_seed: int = 0,
        progress: Progress | None = None,
        positions: Sequence[int] | None = None,
        index: AdvanceIndex | None = None,
        images: ImagesConfig | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        self.settings = settings
        self.train = train
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        if index is None:
            index = read_advance_index(root, split, classes, limit, group_key, limit_seed)
        self.classes: list[str] = list(index.classes)
        label_of = {name: i for i, name in enumerate(self.classes)}
        self.cache = FbankCache(
            (Path(cache_dir) if cache_dir is not None else self.root / ".cache") if cache else None, settings
        )
        whole = positions is None
        skipped: Counter = Counter(index.skipped) if whole else Counter()
        skipped.update(unreadable_image=0, unreadable_sound=0)
        chosen = range(len(index)) if whole else sorted(positions)
        say = progress or (lambda _msg: None)
        self.images, names = index.open_images(chosen, self.root, Geometry(image_size, augment), images)
        self.sound_sources = index.sounds
        self.ids: list[str] = []
        self.labels: list[int] = []
        self.groups: list[str | None] = []
        self.image_names: list[str] = []
        # With a feature cache on disk a clip's frames are read from it on access; without one they are
        # kept here (computing them again at every access would cost far more).
        self.sounds: list[Path | str] = []
        self.features: list[np.ndarray] = []
        for n, (i, name) in enumerate(zip(chosen, names, strict=True)):
            if n and n % 500 == 0:
                say(f"{split}: {n}/{len(chosen)} pairs checked")
            label, sample_id, _, sound_path = index.pairs[i]
            try:
                features = self.cache.load(sound_path, self.sound_sources)
            except UnreadableAudio:
                skipped["unreadable_sound"] += 1
                continue
            if self.images.unreadable(name) is not None:
                skipped["unreadable_image"] += 1
                continue
            self.ids.append(sample_id)
            self.labels.append(label_of[label])
            self.groups.append(index.groups[i])
            self.image_names.append(name)
            self.sounds.append(sound_path)
            if self.cache.folder is None:
                self.features.append(features)
        self.skipped: dict[str, int] = dict(skipped)
        if not self.ids:
            raise DataError(f"no usable image-sound pairs in {index.split_dir} (skipped: {self.skipped})")

    def fingerprint(self) -> str:
        """Which samples this is: ids, files and labels (see :func:`fedmml.data.fingerprint`)."""
        # Paths relative to the root: the same samples in a moved or copied folder are the same data.
        sounds = [p if isinstance(p, str) else p.relative_to(self.root).as_posix() for p in self.sounds]
        return fingerprint(self.ids, self.image_names, sounds, self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose seeded augmentations __getitem__ returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        pixels = self.images.read(self.image_names[index])
        return self._pixels(index, self.epoch, pixels), self._fbank(index), self.labels[index]

    def take(
        self, index: int, epoch: int, skip: Collection[str] = ()
    ) -> tuple[tuple[torch.Tensor | None, torch.Tensor | None, int], int]:
        """The training sample ``index`` presents in ``epoch``, and how many unreadable images were passed
        over for it: a pair whose image fails to read is replaced by the next readable pair. The modalities
        in ``skip`` are not read (None; a cache holds what training needs of them)."""
        if "image" in skip:
            fbank = None if "audio" in skip else self._fbank(index)
            return (None, fbank, self.labels[index]), 0
        position, pixels, missed = read_or_next(self.images, self.image_names, index)
        fbank = None if "audio" in skip else self._fbank(position)
        return (self._pixels(position, epoch, pixels), fbank, self.labels[position]), missed

    def _pixels(self, index: int, epoch: int, pixels: np.ndarray) -> torch.Tensor:
        if self.train and self.augment:
            # Seeded by (seed, epoch, index) so crops do not depend on access order or DataLoader workers.
            sample = f"{self.classes[self.labels[index]]}/{self.ids[index]}"
            pixels = random_resized_crop(pixels, self.image_size, rng=sample_seed(self.seed, epoch, sample))
        return to_tensor(pixels, self.image_size)

    def _fbank(self, index: int) -> torch.Tensor:
        if self.features:
            frames = self.features[index]
        else:
            frames = self.cache.load(self.sounds[index], self.sound_sources)
        return torch.from_numpy(pad_frames(frames, self.settings))

    collate = staticmethod(collate)

    def variants(self, index: int, views: int = 1) -> dict[str, list[torch.Tensor]]:
        """The inputs sample ``index`` presents in training: its filterbank, and one image, or with
        augmentation the ``views`` crops of epochs 0..views-1."""
        count = views if self.train and self.augment else 1
        pixels = self.images.read(self.image_names[index])
        return {
            "image": [self._pixels(index, e, pixels) for e in range(count)],
            "audio": [self._fbank(index)],
        }

    @property
    def label_names(self) -> list[str]:
        """The class name of every sample."""
        return [self.classes[label] for label in self.labels]
