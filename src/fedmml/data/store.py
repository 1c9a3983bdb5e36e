"""Prepared image stores: a folder's images decoded and resized once, read cheaply at training time.

A dataset keeps no pixels in memory; it reads each image from the store when a sample is drawn. The store of
a folder lives in ``<root>/.fedmml-store/<geometry>/`` (or ``data.store_dir``) as shards: ``<id>.bin`` holds
the images one after another, ``<id>.json`` says where each is and which source file (name, size,
modification time) it was made from. A source file that changed no longer matches its entry, so its image is
made again; nothing stale is reused. A client adds a shard for the images it holds that no shard has yet, so
a folder is prepared once, whichever clients or runs ask first; shards are built under a lock and appear
only when complete, so two processes (two SuperNodes on one machine) can open a store at once.

JPEG sources are kept as JPEG (quality 95) at the size training needs and decoded with simplejpeg; other
sources (PNG emoji, ...) are kept as raw pixels, losslessly. Measured in benchmarks/RESULTS.md ("The image
store"): reading a stored image costs a quarter of decoding its 640x480 source.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
from filelock import FileLock
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from fedmml.cache import cache_dir
from fedmml.data import DataError
from fedmml.data.images import UnreadableImage, load_image

FORMAT = 1
QUALITY = 95
CHUNK = 64  # images per worker job
PARALLEL_FROM = 1024  # images to prepare before worker processes pay off
MIN_CROP_AREA = 0.5  # random_resized_crop's smallest area fraction


@dataclass(frozen=True)
class Geometry:
    """What a stored image must still allow: a ``size`` x ``size`` training input, and crops when
    ``augment``."""

    size: int
    augment: bool

    @property
    def side(self) -> int:
        """The short side a stored image keeps under augmentation: even the smallest crop is then at least
        ``size`` pixels across, never enlarged."""
        return math.ceil(self.size / math.sqrt(MIN_CROP_AREA))

    @property
    def name(self) -> str:
        return f"crop{self.side}" if self.augment else f"square{self.size}"

    def fit(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels`` as stored: resized to ``size`` x ``size`` (every access would do it anyway), or under
        augmentation shrunk to a short side of :attr:`side` (never enlarged)."""
        height, width = pixels.shape[:2]
        if not self.augment:
            target = (self.size, self.size)
        else:
            scale = self.side / min(height, width)
            if scale >= 1:
                return pixels
            target = (round(width * scale), round(height * scale))
        if (width, height) == target:
            return pixels
        resized = Image.fromarray(pixels).resize(target, Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.uint8)


def source_key(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _is_jpeg(path: Path) -> bool:
    return path.suffix.lower() in (".jpg", ".jpeg")


def _decode_source(path: Path, geometry: Geometry) -> np.ndarray:
    """A source file's image at the stored geometry."""
    if _is_jpeg(path):
        try:
            return decode_encoded(path.read_bytes(), geometry, str(path))
        except OSError:
            pass  # PIL decides (and names the error)
    return geometry.fit(load_image(path))


def is_jpeg_data(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_encoded(data: bytes, geometry: Geometry, name: str) -> np.ndarray:
    """An encoded image (a file's bytes) at the stored geometry; JPEGs decode at a reduced DCT scale where
    that still leaves enough pixels."""
    if is_jpeg_data(data):
        try:
            need = geometry.side if geometry.augment else geometry.size
            return geometry.fit(
                simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=need, min_width=need)
            )
        except ValueError:
            pass  # CMYK, progressive oddities, truncation: PIL decides (and names the error)
    return geometry.fit(load_image(io.BytesIO(data), name))


def verify_encoded(source: Any) -> bool:
    """Whether PIL takes ``source`` (a path or a file object) for an intact image, without decoding it."""
    try:
        with Image.open(source) as image:
            image.verify()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError):
        return False


class FileSources:
    """Source images as files: a name is a path relative to ``root`` (every built-in format but ``hf``).

    Sources of another kind (:class:`fedmml.data.tables.TableSources`) give the same methods: ``key`` (what
    a stored image was made from, None when missing), ``inode`` (the same file under two names, or None),
    ``decode``, ``keeps_jpeg`` (store it as JPEG) and ``verify``. They are pickled to the store's worker
    processes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def key(self, name: str) -> tuple[int, int] | None:
        return source_key(self.root / name)

    def inode(self, name: str) -> tuple[int, int] | None:
        try:
            stat = (self.root / name).stat()
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    def decode(self, name: str, geometry: Geometry) -> np.ndarray:
        return _decode_source(self.root / name, geometry)

    def keeps_jpeg(self, name: str) -> bool:
        return _is_jpeg(Path(name))

    def verify(self, name: str) -> bool:
        if Path(name).suffix.lower() not in (".jpg", ".jpeg", ".png"):
            return True  # sounds are decoded where they are read, and counted there
        return verify_encoded(self.root / name)


def as_sources(images: Path | Any) -> Any:
    """``images`` as sources: a folder is a :class:`FileSources`, anything else is taken as it is."""
    return FileSources(images) if isinstance(images, Path) else images


def _encode(pixels: np.ndarray, jpeg: bool) -> tuple[bytes, str]:
    if jpeg:
        return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=QUALITY, colorspace="RGB"), "jpeg"
    return np.ascontiguousarray(pixels).tobytes(), "raw"


def _prepare(job: tuple[Any, list[str], Geometry]) -> list[tuple[str, bytes, int, int, str]]:
    """Worker: (name, encoded bytes, height, width, codec) per source; codec "bad" carries the error."""
    sources, names, geometry = job
    out = []
    for name in names:
        try:
            pixels = sources.decode(name, geometry)
        except UnreadableImage as err:
            out.append((name, str(err).encode(), 0, 0, "bad"))
            continue
        data, codec = _encode(pixels, sources.keeps_jpeg(name))
        out.append((name, data, pixels.shape[0], pixels.shape[1], codec))
    return out


class ImageStore:
    """The stored images of one dataset's files, by name; shards are memory-mapped on first read."""

    def __init__(self, directory: Path, entries: dict[str, tuple[str, int, int, int, int, str]]) -> None:
        self.directory = directory
        # name -> (shard, offset, length, height, width, codec)
        self.entries = entries
        self._maps: dict[str, np.memmap] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes map the shards themselves; a pickled memmap would copy its whole file.
        return {**self.__dict__, "_maps": {}}

    def unreadable(self, name: str) -> str | None:
        """Why ``name``'s source could not be decoded, or None when it is stored."""
        shard, offset, length, _, _, codec = self.entries[name]
        return self._bytes(shard, offset, length).decode() if codec == "bad" else None

    def _bytes(self, shard: str, offset: int, length: int) -> bytes:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.directory / f"{shard}.bin", dtype=np.uint8, mode="r")
        return self._maps[shard][offset : offset + length].tobytes()

    def read(self, name: str) -> np.ndarray:
        """The stored uint8 RGB array of ``name``; :class:`UnreadableImage` when its bytes do not decode."""
        shard, offset, length, height, width, codec = self.entries[name]
        try:
            data = self._bytes(shard, offset, length)
            if codec == "jpeg":
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            if codec == "raw":
                return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3).copy()
        except (OSError, ValueError) as err:
            raise UnreadableImage(f"cannot read {name} from the image store {self.directory}: {err}") from err
        raise UnreadableImage(f"cannot read image {name}: {data.decode()}")


# Shard indexes parsed in this process, by path, with the (size, mtime) they were read at: every client of
# an in-process simulation opens the same store for its train and test split, and a COCO-sized index takes
# about half a second to parse.
_parsed: dict[Path, tuple[tuple[int, int] | None, list]] = {}


def _index_entries(index: Path) -> list:
    """The entries of one shard index; none for an index that is unreadable or of another format."""
    key = source_key(index)
    if index in _parsed and _parsed[index][0] == key:
        return _parsed[index][1]
    try:
        shard = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return []  # a shard being replaced by a process that crashed: its images are made again
    entries = shard["entries"] if shard.get("format") == FORMAT else []
    _parsed[index] = (key, entries)
    return entries


# The entries of every complete shard of a store directory, by directory, with the directory's mtime when
# they were gathered: adding, renaming or removing a shard changes it. Each client of a simulation opens the
# store for its own samples; with thousands of clients and shards, gathering anew each time (a stat per
# shard, the whole set rebuilt) took most of the run's setup.
_gathered: dict[Path, tuple[int, dict[tuple[str, int, int], tuple]]] = {}


def _shard_entries(directory: Path, fresh: bool = False) -> dict[tuple[str, int, int], tuple]:
    """(name, size, mtime_ns) -> (shard, offset, length, height, width, codec) over every complete shard: one
    whose images file is shorter than its index says (a disk that filled up, a copy cut short) holds none,
    so its images are made again. Reused while the directory is unchanged, unless ``fresh`` (under the
    store's lock, where a shard added within the same mtime tick must not be missed)."""
    try:
        stamp = directory.stat().st_mtime_ns
    except OSError:
        stamp = None
    if not fresh and stamp is not None and directory in _gathered and _gathered[directory][0] == stamp:
        return _gathered[directory][1]
    found: dict[tuple[str, int, int], tuple] = {}
    for index in sorted(directory.glob("*.json")):
        entries = _index_entries(index)
        if not _complete(index, entries):
            continue
        for name, size, mtime, offset, length, height, width, codec in entries:
            found[(name, size, mtime)] = (index.stem, offset, length, height, width, codec)
    if stamp is not None:
        _gathered[directory] = (stamp, found)
    return found


def _complete(index: Path, entries: list) -> bool:
    """Whether the images file of the shard ``index`` holds every byte its entries point at."""
    try:
        size = index.with_suffix(".bin").stat().st_size
    except OSError:
        return False
    return size >= max((entry[3] + entry[4] for entry in entries), default=0)


def _sweep(directory: Path) -> None:
    """Remove what no reader may take (called under the store's lock, so no build is under way): the files
    of incomplete shards, images files without an index (a build that was killed) and unfinished indexes."""
    for index in directory.glob("*.json"):
        if not _complete(index, _index_entries(index)):
            index.unlink(missing_ok=True)
            index.with_suffix(".bin").unlink(missing_ok=True)
    for blob in directory.glob("*.bin"):
        if not blob.with_suffix(".json").exists():
            blob.unlink(missing_ok=True)
    for tmp in directory.glob("*.tmp"):
        tmp.unlink(missing_ok=True)


def open_store(
    images: Path | Any,
    names: Sequence[str],
    geometry: Geometry,
    store_dir: Path,
    workers: int = 0,
) -> ImageStore:
    """The store under ``store_dir`` of ``names`` (paths relative to the folder ``images``, or names of
    other sources), made for the ones no shard holds yet."""
    sources = as_sources(images)
    directory = store_dir / geometry.name
    keys: dict[str, tuple[str, int, int]] = {}
    for name in names:
        key = sources.key(name)
        keys[name] = (name, *key) if key is not None else (name, -1, -1)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create the image store {directory}: {err.strerror}; set data.store_dir to a writable "
            "folder (or data.store = false)"
        ) from None
    found = _shard_entries(directory)
    if any(key not in found for key in keys.values()):
        with FileLock(str(directory / ".lock")):
            _sweep(directory)
            found = _shard_entries(directory, fresh=True)  # another process may have made them meanwhile
            missing = sorted({key for key in keys.values() if key not in found})
            if missing:
                _build_shard(sources, directory, missing, geometry, workers)
                found = _shard_entries(directory, fresh=True)
    return ImageStore(directory, {name: found[key] for name, key in keys.items()})


def _build_shard(
    sources: Any,
    directory: Path,
    missing: list[tuple[str, int, int]],
    geometry: Geometry,
    workers: int,
) -> None:
    """Decode ``missing`` in parallel into one new shard; it becomes visible when its index is renamed into
    place, so a crash leaves nothing a reader would take."""
    shard = uuid.uuid4().hex
    blob, index = directory / f"{shard}.bin", directory / f"{shard}.json"
    # Hard links to one file (prepared image-audio sets share an image between samples) are stored once.
    first: dict[tuple[int, int], tuple[str, int, int]] = {}
    same: dict[tuple[str, int, int], tuple[str, int, int]] = {}
    for key in missing:
        inode = sources.inode(key[0])
        if inode is not None:
            same[key] = first.setdefault(inode, key)
    unique = [key for key in missing if same.get(key, key) == key]
    chunks = [unique[s : s + CHUNK] for s in range(0, len(unique), CHUNK)]
    jobs = [(sources, [k[0] for k in keys], geometry) for keys in chunks]
    entries: list[list[Any]] = []
    offset = 0
    # On stderr, and only on a terminal (disable=None): logs and CI output stay clean.
    bar = tqdm(total=len(unique), desc=f"preparing {directory}", unit="img", disable=None, leave=False)
    try:
        with bar, open(blob, "wb") as out:
            for n, (batch, keys) in enumerate(zip(_run_jobs(jobs, workers), chunks, strict=True)):
                if n == 0:
                    _check_space(directory, batch, len(unique))
                for (name, data, height, width, codec), key in zip(batch, keys, strict=True):
                    out.write(data)
                    entries.append([name, key[1], key[2], offset, len(data), height, width, codec])
                    offset += len(data)
                bar.update(len(batch))
        where = {entry[0]: entry[3:] for entry in entries}
        entries += [[k[0], k[1], k[2], *where[o[0]]] for k, o in same.items() if o != k]
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "geometry": geometry.name, "entries": entries}))
        os.replace(tmp, index)
    except BaseException as err:
        blob.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DataError(
                f"no space left for the image store {directory}: it needs about "
                f"{_mb(offset, len(entries), len(unique))}"
            ) from None
        raise


def _run_jobs(jobs: list, workers: int):
    if workers <= 0:
        yield from map(_prepare, jobs)
        return
    # Spawned, not forked: the caller may hold threads (PyTorch, Ray) whose locks a fork would copy held.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_prepare, jobs)


def _mb(done_bytes: int, done: int, total: int) -> str:
    return f"{done_bytes / max(done, 1) * total / 2**20:,.0f} MiB"


def _check_space(directory: Path, first: list[tuple[str, bytes, int, int, str]], total: int) -> None:
    """Refuse, before writing the rest, a store the disk cannot hold (estimated from the first images)."""
    size = sum(len(item[1]) for item in first)
    need = size / max(len(first), 1) * total
    free = shutil.disk_usage(directory).free
    if need > free:
        raise DataError(
            f"no space left for the image store {directory}: it needs about {_mb(size, len(first), total)}, "
            f"{free / 2**20:,.0f} MiB are free"
        )


class SourceImages:
    """Images decoded from their sources at every access (``data.store = false``)."""

    def __init__(self, sources: Any, geometry: Geometry) -> None:
        self.sources = sources
        self.geometry = geometry

    def unreadable(self, name: str) -> str | None:
        return None  # found out only on access

    def read(self, name: str) -> np.ndarray:
        return self.sources.decode(name, self.geometry)


@dataclass(frozen=True)
class ImagesConfig:
    """How a dataset gets its pixels: from a store (under ``store_dir``, default beside the images, built with
    ``workers`` processes, with a progress bar on a terminal) or, without ``store``, from the sources each
    time."""

    store: bool = True
    store_dir: Path | None = None
    workers: int = 0


def open_images(
    images: Path | Any,
    names: Sequence[str],
    geometry: Geometry,
    conf: ImagesConfig | None = None,
    home: Path | None = None,
) -> ImageStore | SourceImages:
    """What a dataset reads ``names`` (relative to the folder ``images``, or names of other sources) from,
    as ``conf`` says; a store lives in ``conf.store_dir``, else in ``<home>/.fedmml-store`` (``home``: the
    dataset's root, by default the folder above ``images``)."""
    conf = conf or ImagesConfig()
    sources = as_sources(images)
    if not conf.store:
        return SourceImages(sources, geometry)
    # Small sets are prepared in this process: starting workers would cost more than it saves.
    workers = conf.workers if len(names) >= PARALLEL_FROM else 0
    store_dir = conf.store_dir or default_store_dir(home or sources.root.parent)
    return open_store(sources, names, geometry, store_dir, workers)


def default_store_dir(home: Path) -> Path:
    """Where a store lives unless ``data.store_dir`` says: ``<home>/.fedmml-store``, beside the data, where
    every process that reads it finds it; for a folder that cannot be written there (a read-only or shared
    data set, a server's copy of the test split), a folder of the user's cache named for ``home``."""
    beside = home / ".fedmml-store"
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    return cache_dir("stores", hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16])


def read_or_next(
    images: ImageStore | SourceImages, names: Sequence[str], index: int
) -> tuple[int, np.ndarray, int]:
    """(position, pixels, images passed over): ``names[index]``'s pixels, or when it cannot be read those of
    the next readable name (wrapping around), so a batch stays full."""
    for missed in range(len(names)):
        position = (index + missed) % len(names)
        try:
            return position, images.read(names[position]), missed
        except UnreadableImage:
            continue
    raise DataError(f"no image of {len(names)} can be read (from {getattr(images, 'directory', '')})")
