"""Chosen samples of one split written out as a folder of the same layout (a node's own data).

Files are hard-linked where the target lies on the source's file system (no second copy of a large image
set), else copied. Metadata keeps every field of the source's records, so a folder reads exactly as its
samples did in the source: same ids, captions, categories, groups and identities. Image-text data in another
format (COCO 2017, Karpathy splits, a Hugging Face dataset) is written in fedmml's own layout, its images
placed as they are named or, for rows of a data file, written out as ``<id>.jpg`` (or ``.png``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedmml.data import DataError, identity_value
from fedmml.data.advance import AdvanceIndex
from fedmml.data.coco import CaptionIndex
from fedmml.data.images import UnreadableImage
from fedmml.data.store import FileSources, is_jpeg_data


def place(source: Path, target: Path, link: bool = True) -> None:
    """``source`` at ``target``: a hard link when ``link`` and the file systems allow, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system, or one without hard links
    shutil.copyfile(source, target)


def _coco_captions(path: Path) -> dict | None:
    """The COCO captions JSON at ``path``; None for a file of another kind (a Karpathy splits file, a
    Hugging Face dataset's data file)."""
    if path.suffix != ".json":
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) and "annotations" in data else None


def write_caption_subset(
    index: CaptionIndex,
    positions: Iterable[int],
    dst: Path,
    split: str,
    images_dir: str = "images",
    link: bool = True,
    identity_key: str = "",
) -> int:
    """The images of ``index`` at ``positions`` under ``dst / images_dir``, and its captions file restricted
    to them as ``dst / captions_<split>.json`` (fedmml's own layout, whatever the source's format); the
    number of images written. A COCO captions file keeps its records and annotations as they are."""
    data = _coco_captions(index.captions_path)
    if data is None:
        return _write_from_index(index, list(positions), dst, split, images_dir, link, identity_key)
    keep = {index.image_ids[i] for i in positions}
    images = [im for im in data["images"] if isinstance(im, dict) and im.get("id") in keep]
    annotations = [
        a for a in data.get("annotations", []) if isinstance(a, dict) and a.get("image_id") in keep
    ]
    for record in images:
        source = index.images_path / record["file_name"]
        if source.is_file():  # a missing image stays missing, and is counted where it is read, as before
            place(source, dst / images_dir / record["file_name"], link)
    dst.mkdir(parents=True, exist_ok=True)
    written = {key: value for key, value in data.items() if key not in ("images", "annotations")}
    written |= {"images": images, "annotations": annotations}
    (dst / f"captions_{split}.json").write_text(json.dumps(written), encoding="utf-8")
    return len(images)


def _write_from_index(
    index: CaptionIndex,
    positions: list[int],
    dst: Path,
    split: str,
    images_dir: str,
    link: bool,
    identity_key: str,
) -> int:
    """A COCO captions file made from the index's own columns (ids, captions, categories, identities), and
    its images: files placed as they are named, rows of a data file written as ``<id>.jpg`` or ``.png``."""
    sources = index.images()
    images, annotations = [], []
    for i in positions:
        image_id, name = index.image_ids[i], index.file_names[i]
        if isinstance(sources, FileSources):
            file_name = name
            if (sources.root / name).is_file():
                place(sources.root / name, dst / images_dir / name, link)
        else:
            try:
                data = sources.encoded(name)
            except UnreadableImage:
                data = b""  # a row without an image stays without one, counted where it is read
            file_name = f"{image_id}.{'jpg' if not data or is_jpeg_data(data) else 'png'}"
            if data:
                (dst / images_dir).mkdir(parents=True, exist_ok=True)
                (dst / images_dir / file_name).write_bytes(data)
        record: dict[str, Any] = {"id": image_id, "file_name": file_name}
        if index.labels[i] is not None:
            record["category"] = index.labels[i]
        if (value := identity_value(identity_key, index.identities[i])) is not None:
            record[identity_key] = value
        images.append(record)
        first = len(annotations)
        annotations += [
            {"id": first + k, "image_id": image_id, "caption": caption}
            for k, caption in enumerate(index.captions[i])
        ]
    dst.mkdir(parents=True, exist_ok=True)
    written = {"images": images, "annotations": annotations}
    (dst / f"captions_{split}.json").write_text(json.dumps(written), encoding="utf-8")
    return len(images)


SOUND_TYPES = {b"RIFF": "wav", b"OggS": "ogg", b"fLaC": "flac"}


def write_advance_subset(
    index: AdvanceIndex,
    positions: Iterable[int],
    dst: Path,
    split: str,
    link: bool = True,
    group_key: str = "",
    identity_key: str = "",
) -> int:
    """The pairs of ``index`` at ``positions`` under ``dst / split`` (``vision/<class>/``,
    ``sound/<class>/`` and their ``meta.json`` entries); every class of the split gets its folders, so a
    node that holds none of a class still names it. The pairs of a Hugging Face dataset's rows are written
    as ``<id>.<jpg|png>`` and ``<id>.<wav|ogg|flac>``, their groups and identities (``group_key``,
    ``identity_key``) into ``meta.json``. The number of pairs written."""
    folder = dst / split
    for kind in ("vision", "sound"):
        for name in index.classes:
            (folder / kind / name).mkdir(parents=True, exist_ok=True)
    positions = list(positions)
    chosen = [index.pairs[i] for i in positions]
    if index.sources is not None:
        return _write_rows(index, positions, folder, group_key, identity_key)
    for name, _, image, sound in chosen:
        place(image, folder / "vision" / name / image.name, link)
        place(sound, folder / "sound" / name / sound.name, link)
    meta_path = index.split_dir / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot parse {meta_path}: {err}") from None
        ids = {sample_id for _, sample_id, _, _ in chosen}
        kept = {k: v for k, v in meta.items() if k in ids}
        (folder / "meta.json").write_text(json.dumps(kept, ensure_ascii=False), encoding="utf-8")
    return len(chosen)


def _write_rows(
    index: AdvanceIndex, positions: list[int], folder: Path, group_key: str, identity_key: str
) -> int:
    """The rows of a Hugging Face dataset at ``positions`` as ADVANCE files; a row's missing half stays
    missing (the pair is then counted where it is read)."""
    meta: dict[str, dict[str, str]] = {}
    for i in positions:
        name, sample_id, image, sound = index.pairs[i]
        for kind, sources, what in (("vision", index.sources, image), ("sound", index.sounds, sound)):
            try:
                data = sources.encoded(what)
            except sources.error:
                continue
            if kind == "vision":
                suffix = "jpg" if is_jpeg_data(data) else "png"
            else:
                suffix = SOUND_TYPES.get(data[:4], "wav")
            (folder / kind / name / f"{sample_id}.{suffix}").write_bytes(data)
        entry = {}
        if group_key and index.groups[i] is not None:
            entry[group_key] = index.groups[i]
        if (value := identity_value(identity_key, index.identities[i])) is not None:
            entry[identity_key] = value
        if entry:
            meta[sample_id] = entry
    (folder / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    return len(positions)
