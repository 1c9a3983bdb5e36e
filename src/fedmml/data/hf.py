"""Hugging Face datasets as they sit on disk (``data.format = "hf"``), read in place with pyarrow.

Two shapes, as ``datasets`` and the Hub write them:

- a ``save_to_disk`` folder: ``dataset_dict.json`` and a folder per split (each with ``state.json`` and its
  Arrow files), or a single dataset's ``state.json`` and Arrow files (its one split is ``train``);
- Parquet files: ``<split>.parquet`` or ``<split>-00000-of-00002.parquet`` in the folder or in its
  ``data/`` (the Hub's layout, ``to_parquet``), or any ``.parquet`` in a ``<split>/`` folder.

For image-text, one row is one image: its image column (``datasets.Image``'s ``{bytes, path}``, raw bytes,
or a path), its captions (a string or a list of strings), and optionally an id, a category and an identity
column. For image + sound, one row is a pair: an image, an audio (``datasets.Audio``'s ``{bytes, path}``)
and a label column. The index reads the caption (or label), id, group and identity columns only, so
partitioning decodes nothing and copies nothing; a client reads its own rows' images and sounds when it
prepares its share (into the image store and the feature cache), as it would read files. A sample's name is
``<data file>#<row>``: a data file that changed makes its stored images and features again.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedmml.data import DataError, sample_identity
from fedmml.data.advance import AdvanceIndex
from fedmml.data.audio import UnreadableAudio
from fedmml.data.coco import CaptionIndex
from fedmml.data.images import UnreadableImage
from fedmml.data.store import Geometry, decode_encoded, is_jpeg_data, source_key, verify_encoded

if TYPE_CHECKING:
    from fedmml.config import Config

CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "sentences_raw")
_SPLIT_OF_FILE = re.compile(r"^([A-Za-z0-9_]+?)(?:[-.].*)?$")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot parse {path}: {err}") from None


def _state_files(folder: Path) -> list[Path]:
    """A ``save_to_disk`` split's Arrow files, in row order."""
    state = _json(folder / "state.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
        raise DataError(f"{folder / 'state.json'} lists no data files (_data_files)")
    return [folder / f["filename"] for f in files]


def data_files(root: Path) -> dict[str, list[Path]]:
    """Each split of the dataset on disk at ``root`` and its data files, in row order; empty when ``root``
    holds none."""
    if (root / "dataset_dict.json").is_file():
        splits = _json(root / "dataset_dict.json").get("splits")
        if not isinstance(splits, list):
            raise DataError(f"{root / 'dataset_dict.json'} lists no splits")
        return {split: _state_files(root / split) for split in splits}
    if (root / "state.json").is_file():
        return {"train": _state_files(root)}
    found: dict[str, list[Path]] = {}
    for folder in (root, root / "data"):
        for path in sorted(folder.glob("*.parquet")):
            match = _SPLIT_OF_FILE.match(path.stem)
            if match:
                found.setdefault(match[1], []).append(path)
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "data"):
            for path in sorted(folder.glob("*.parquet")):
                found.setdefault(folder.name, []).append(path)
    return found


@lru_cache(maxsize=64)
def _arrow_table(path: Path, key: tuple[int, int] | None) -> pa.Table:
    # Memory-mapped: the image bytes are not read until a row's image is.
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"cannot read {path}: {err}") from None


@lru_cache(maxsize=64)
def _parquet_file(path: Path, key: tuple[int, int] | None) -> tuple[pq.ParquetFile, np.ndarray]:
    """The file and the first row of each of its row groups."""
    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    rows = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
    return file, np.cumsum([0, *rows])


@lru_cache(maxsize=4)
def _row_group(path: Path, key: tuple[int, int] | None, group: int, column: str) -> pa.ChunkedArray:
    # A store build reads rows in order, so one group at a time is read once.
    file, _ = _parquet_file(path, key)
    return file.read_row_group(group, columns=[column]).column(column)


def _columns(path: Path, names: list[str]) -> tuple[dict[str, list[Any]], pa.Schema]:
    """The columns ``names`` of one data file (those it has), and its schema."""
    key = source_key(path)
    names = list(dict.fromkeys(names))
    if path.suffix == ".parquet":
        schema = _parquet_file(path, key)[0].schema_arrow
        table = pq.read_table(path, columns=[n for n in names if n in schema.names])
    else:
        table = _arrow_table(path, key)
        schema = table.schema
    return {n: table.column(n).to_pylist() for n in names if n in schema.names}, schema


def _class_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The names of a ``ClassLabel`` column, from the ``datasets`` metadata in the schema."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(meta)["info"]["features"][column] if meta else None
    except (KeyError, TypeError, json.JSONDecodeError):
        return None
    return feature.get("names") if isinstance(feature, dict) else None


def _captions(cell: Any, skipped: Counter) -> list[str]:
    cells = cell if isinstance(cell, list) else [cell]
    out = []
    for one in cells:
        text = one.get("raw") if isinstance(one, dict) else one  # Karpathy-style {"raw": ...} sentences
        if isinstance(text, str) and text.strip():
            out.append(text.strip())
        else:
            skipped["bad_caption"] += 1
    return out


def _require(path: Path, schema: pa.Schema, *columns: tuple[str, str]) -> None:
    """One line naming the first of ``columns`` ((name, what it holds) pairs) that ``path`` lacks."""
    for name, what in columns:
        if name not in schema.names:
            raise DataError(
                f"{path} has no {what} column {name!r} (columns: {', '.join(schema.names)}); "
                f"set data.{what}_column"
            )


def _split_files(root: Path, split: str) -> list[Path]:
    found = data_files(root)
    if not found.get(split):
        raise DataError(
            f"no split {split!r} in the Hugging Face dataset at {root} (found: {', '.join(found) or 'none'})"
        )
    return found[split]


def read_hf_index(root: Path, split: str, cfg: Config) -> CaptionIndex:
    """The index of ``split`` of the dataset on disk at ``root``: ids, ``<file>#<row>`` names, captions,
    categories and identities, from the columns ``data.*_column`` name."""
    d = cfg.data
    files = _split_files(root, split)
    skipped = Counter(bad_image_entry=0, bad_caption=0, image_without_caption=0, unreadable_image=0)
    index = CaptionIndex(
        files[0], root, [], [], [], [], {}, home=root, sources=TableSources(root, d.image_column)
    )
    seen: set[Any] = set()
    position = 0
    for path in files:
        wanted = [d.caption_column or "", d.id_column, d.label_column, d.identity_key]
        columns, schema = _columns(path, [*CAPTION_COLUMNS, *(c for c in wanted if c)])
        caption_column = d.caption_column or next((c for c in CAPTION_COLUMNS if c in columns), "")
        _require(path, schema, (d.image_column, "image"), (caption_column, "caption"))
        classes = _class_names(schema, d.label_column) if d.label_column else None
        where = path.relative_to(root).as_posix()
        for row, cell in enumerate(columns[caption_column]):
            position += 1
            image_id = columns[d.id_column][row] if d.id_column else position - 1
            if d.id_column and (not isinstance(image_id, int | str) or image_id in seen):
                skipped["bad_image_entry"] += 1
                continue
            seen.add(image_id)
            captions = _captions(cell, skipped)
            if not captions:
                skipped["image_without_caption"] += 1
                continue
            label = columns[d.label_column][row] if d.label_column in columns else None
            if classes is not None and isinstance(label, int) and 0 <= label < len(classes):
                label = classes[label]
            identity = columns[d.identity_key][row] if d.identity_key in columns else None
            index.image_ids.append(image_id)
            index.file_names.append(f"{where}#{row}")
            index.captions.append(captions)
            index.labels.append(None if label is None else str(label))
            index.identities.append(sample_identity(d.identity_key, identity, image_id))
    index.skipped = dict(skipped)
    if not index.image_ids:
        raise DataError(
            f"no usable image-caption pairs in split {split!r} of {root} (skipped: {index.skipped})"
        )
    return index


def read_hf_av_index(root: Path, split: str, cfg: Config) -> AdvanceIndex:
    """The index of ``split`` for image + sound classification: one row per pair, its image and audio
    columns (``data.image_column``, ``data.audio_column``), its class (``data.label_column``, by default
    ``label``; the classes are ``data.classes``, else the column's ``ClassLabel`` names or the training
    split's sorted labels), its group (the ``partition.group`` column, when there is one) and identity."""
    d = cfg.data
    files = _split_files(root, split)
    label_column = d.label_column or "label"
    names = list(d.classes) or hf_classes(root, cfg)
    skipped = Counter(missing_image=0, missing_sound=0, unknown_class=0, duplicate_id=0)
    sources = TableSources(root, d.image_column)
    sounds = TableSources(root, d.audio_column, UnreadableAudio)
    index = AdvanceIndex(root, names, [], [], {}, [], sources, sounds)
    known, seen, position = set(names), set(), 0
    for path in files:
        wanted = [label_column, d.id_column, cfg.partition.group, d.identity_key]
        columns, schema = _columns(path, [c for c in wanted if c])
        _require(path, schema, (d.image_column, "image"), (d.audio_column, "audio"), (label_column, "label"))
        classes = _class_names(schema, label_column)
        where = path.relative_to(root).as_posix()
        for row, label in enumerate(columns[label_column]):
            position += 1
            sample_id = str(columns[d.id_column][row] if d.id_column else position - 1)
            if isinstance(label, int) and classes and 0 <= label < len(classes):
                label = classes[label]
            if str(label) not in known:
                skipped["unknown_class"] += 1
                continue
            if sample_id in seen:
                skipped["duplicate_id"] += 1
                continue
            seen.add(sample_id)
            name = f"{where}#{row}"
            index.pairs.append((str(label), sample_id, name, name))
            group = columns[cfg.partition.group][row] if cfg.partition.group in columns else None
            index.groups.append(group if isinstance(group, str) else None)
            identity = columns[d.identity_key][row] if d.identity_key in columns else None
            index.identities.append(sample_identity(d.identity_key, identity, sample_id))
    index.skipped = dict(skipped)
    if not index.pairs:
        raise DataError(f"no usable image-sound pairs in split {split!r} of {root} ({index.skipped})")
    return index


def hf_classes(root: Path, cfg: Config) -> list[str]:
    """The class names of an image + sound dataset on disk: its label column's ``ClassLabel`` names, else
    the sorted labels of its training split (else of its test split)."""
    label_column = cfg.data.label_column or "label"
    found = data_files(root)
    files = found.get(cfg.data.train_split) or found.get(cfg.data.test_split) or []
    labels: set[str] = set()
    for path in files:
        columns, schema = _columns(path, [label_column])
        names = _class_names(schema, label_column)
        if names:
            return list(names)
        labels |= {str(v) for v in columns.get(label_column, []) if v is not None}
    return sorted(labels)


def read_hf(root: Path, split: str, cfg: Config) -> CaptionIndex | AdvanceIndex:
    """The index of ``split`` for the run's task."""
    if cfg.model.task == "image-audio":
        return read_hf_av_index(root, split, cfg)
    return read_hf_index(root, split, cfg)


def hf_task(root: Path, column: str = "audio") -> str:
    """``image-audio`` when the dataset at ``root`` has an audio column (by default ``audio``), else
    ``image-text``."""
    files = next(iter(data_files(root).values()), [])
    return "image-audio" if files and column in _columns(files[0], [])[1].names else "image-text"


def hf_splits(root: Path, cfg: Config) -> list[str]:
    return sorted(data_files(root))


class TableSources:
    """The images (or sounds) of a dataset on disk, by ``<data file>#<row>`` name (see :class:`~fedmml.
    data.store.FileSources` for the methods); tables are opened once per process, so pickling sends the
    fields. A row without a readable value raises ``error``."""

    def __init__(self, root: Path, column: str, error: type[Exception] = UnreadableImage) -> None:
        self.root = root
        self.column = column
        self.error = error

    def _where(self, name: str) -> tuple[Path, int]:
        file, _, row = name.rpartition("#")
        return self.root / file, int(row)

    def key(self, name: str) -> tuple[int, int] | None:
        return source_key(self._where(name)[0])

    def inode(self, name: str) -> None:
        return None  # rows are never hard links of one another

    def encoded(self, name: str) -> bytes:
        """The row's encoded image; :class:`UnreadableImage` when it has none."""
        path, row = self._where(name)
        key = source_key(path)
        try:
            if path.suffix == ".parquet":
                _, starts = _parquet_file(path, key)
                group = int(np.searchsorted(starts, row, side="right")) - 1
                cell = _row_group(path, key, group, self.column)[row - int(starts[group])].as_py()
            else:
                cell = _arrow_table(path, key).column(self.column)[row].as_py()
        except (DataError, KeyError, IndexError, pa.ArrowException) as err:
            raise self.error(f"cannot read {self.column} {name}: {err}") from None
        if isinstance(cell, dict):  # datasets.Image and Audio: the bytes, or a file beside the data
            data, cell = cell.get("bytes"), cell.get("path")
            if data:
                return data
        if isinstance(cell, bytes) and cell:
            return cell
        if isinstance(cell, str) and cell:
            try:
                return (path.parent / cell).read_bytes()  # an absolute path stays as it is
            except OSError as err:
                raise self.error(f"cannot read {self.column} {name} ({cell}): {err.strerror}") from None
        raise self.error(f"cannot read {self.column} {name}: the row has none")

    def decode(self, name: str, geometry: Geometry) -> np.ndarray:
        return decode_encoded(self.encoded(name), geometry, name)

    def keeps_jpeg(self, name: str) -> bool:
        return is_jpeg_data(self.encoded(name))

    def verify(self, name: str) -> bool:
        try:
            data = self.encoded(name)
        except self.error:
            return False
        # Sounds are decoded where they are read, and counted there.
        return verify_encoded(io.BytesIO(data)) if self.error is UnreadableImage else True
