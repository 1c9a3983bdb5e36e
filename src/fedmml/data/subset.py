"""Chosen samples of one split written out as a folder of the same layout (a node's own data).

Files are hard-linked where the target lies on the source's file system (no second copy of a large image
set), else copied. Metadata keeps every field of the source's records, so a folder reads exactly as its
samples did in the source: same ids, captions, categories, groups and identities.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from fedmml.data import DataError
from fedmml.data.advance import AdvanceIndex
from fedmml.data.coco import CaptionIndex


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


def write_caption_subset(
    index: CaptionIndex,
    positions: Iterable[int],
    dst: Path,
    split: str,
    images_dir: str = "images",
    link: bool = True,
) -> int:
    """The images of ``index`` at ``positions`` under ``dst / images_dir``, and its captions file restricted
    to them (records and annotations as they are) as ``dst / captions_<split>.json``; the number of images
    written."""
    data = json.loads(index.captions_path.read_text(encoding="utf-8"))
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


def write_advance_subset(
    index: AdvanceIndex, positions: Iterable[int], dst: Path, split: str, link: bool = True
) -> int:
    """The pairs of ``index`` at ``positions`` under ``dst / split`` (``vision/<class>/``,
    ``sound/<class>/`` and their ``meta.json`` entries); every class of the split gets its folders, so a
    node that holds none of a class still names it. The number of pairs written."""
    folder = dst / split
    for kind in ("vision", "sound"):
        for name in index.classes:
            (folder / kind / name).mkdir(parents=True, exist_ok=True)
    chosen = [index.pairs[i] for i in positions]
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
