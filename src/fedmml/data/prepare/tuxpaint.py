"""Build an ADVANCE-layout image + speech dataset from the Debian package tuxpaint-stamps-default."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedmml.data.prepare.output import (
    PrepareError,
    check_owned,
    dump_json,
    staging_dir,
    stored_stats,
    swap_in,
)

PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
INSTALL_HINT = f"install it (as root) with `apt-get install -y --no-install-recommends {PACKAGE}`"
FORMAT = 1  # bump when the output layout, ids or class mapping change, so old folders are rebuilt
LICENSE = "GPL-2.0-or-later (Tux Paint stamps, New Breed Software and contributors; Debian package)"

# Source folder (longest prefix wins) -> class. The 16 top-level folders become 12 classes of 16+ stamps:
# small folders merge into a neighbour by theme, and the 158 alphabet stamps split off from symbols.
CLASS_MAP = {
    "animals": "animals",
    "clothes": "clothes_people",
    "people": "clothes_people",
    "food": "food",
    "hobbies": "hobbies_sports",
    "sports": "hobbies_sports",
    "household": "household",
    "medical": "household",
    "plants": "nature",
    "naturalforces": "nature",
    "seasonal": "seasonal",
    "space": "space",
    "symbols": "symbols",
    "symbols/alphabets": "letters",
    "town": "town",
    "vehicles": "vehicles",
    "military": "vehicles",
}
CLASSES = tuple(sorted(set(CLASS_MAP.values())))
# <stamp>_desc.ogg is English; one clip in the package carries a doubled ".ogg.ogg" extension.
DESC = re.compile(
    r"^(?P<stem>.+)_desc(?:_(?P<lang>[a-z]{2,3}(?:_[A-Z]{2})?))?(?P<ext>\.ogg|\.wav)(?:\.ogg)?$"
)

Progress = Callable[[str], None]


class TuxPaintNotInstalled(PrepareError, FileNotFoundError):
    """The tuxpaint-stamps-default stamp folder is missing."""


@dataclass
class Stamp:
    """One stamp: its PNG, English caption and spoken descriptions by language."""

    key: str  # path under the stamps folder without extension, e.g. "animals/mammals/badger"
    image: Path
    caption: str | None
    clips: dict[str, Path] = field(default_factory=dict)

    @property
    def label(self) -> str | None:
        """The class of this stamp, or None for a folder CLASS_MAP does not know."""
        parts = self.key.split("/")
        for depth in range(len(parts) - 1, 0, -1):
            found = CLASS_MAP.get("/".join(parts[:depth]))
            if found is not None:
                return found
        return None


def _caption(path: Path) -> str | None:
    # The first line of <stamp>.txt is the English description; the rest are translations.
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return lines[0].strip() if lines and lines[0].strip() else None


def find_stamps(stamps_dir: Path = STAMPS_DIR) -> tuple[list[Stamp], Counter]:
    """Every PNG stamp with its clips, sorted by key, and counts of what was left out and why."""
    if not stamps_dir.is_dir():
        raise TuxPaintNotInstalled(f"Tux Paint stamps not found in {stamps_dir}; {INSTALL_HINT}")
    skipped: Counter = Counter(svg_only=0, mirror_variant=0, no_description=0, unknown_category=0)
    stamps: list[Stamp] = []
    for folder, _dirs, names in sorted(os.walk(stamps_dir)):
        folder_path = Path(folder)
        names = set(names)
        clips: dict[str, dict[str, Path]] = {}
        for name in sorted(names):
            match = DESC.match(name)
            if match:
                clips.setdefault(match["stem"], {}).setdefault(match["lang"] or "en", folder_path / name)
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext == ".svg" and f"{stem}.png" not in names and not stem.endswith("_mirror"):
                skipped["svg_only"] += 1
            if ext != ".png":
                continue
            if stem.endswith("_mirror") and (f"{stem[:-7]}.png" in names or f"{stem[:-7]}.svg" in names):
                skipped["mirror_variant"] += 1  # a flipped copy of another stamp, not a new picture
                continue
            key = (folder_path / stem).relative_to(stamps_dir).as_posix()
            stamp = Stamp(key, folder_path / name, _caption(folder_path / f"{stem}.txt"), clips.get(stem, {}))
            if not stamp.clips:
                skipped["no_description"] += 1
            elif stamp.label is None:
                skipped["unknown_category"] += 1
            else:
                stamps.append(stamp)
    stamps.sort(key=lambda s: s.key)
    return stamps, skipped


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def pick_test_stamps(stamps: Iterable[Stamp], test_fraction: float) -> set[str]:
    """Keys of the test stamps: per class, the round(fraction * n) (at least 1) with the lowest hash."""
    by_class: dict[str | None, list[str]] = {}
    for stamp in stamps:
        by_class.setdefault(stamp.label, []).append(stamp.key)
    chosen: set[str] = set()
    for keys in by_class.values():
        # Stratified so that small classes still appear in test; a stable hash keeps it deterministic.
        count = max(1, round(test_fraction * len(keys))) if len(keys) > 1 else 0
        chosen.update(sorted(keys, key=_rank)[:count])
    return chosen


def sample_id(key: str, language: str) -> str:
    """File-name-safe id of one (stamp, language) sample, e.g. 'animals__mammals__badger__fr'."""
    return f"{key.replace('/', '__')}__{language}"


def package_version() -> str:
    """The installed Debian package version, or 'unknown' without dpkg."""
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True, check=False
        )
    except OSError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def _select(
    stamps: list[Stamp], classes: Iterable[str] | None, languages: Iterable[str] | None, limit: int
) -> list[Stamp]:
    wanted = set(classes) if classes is not None else None
    unknown = sorted(wanted - set(CLASSES)) if wanted is not None else []
    if unknown:
        raise ValueError(f"unknown Tux Paint classes {unknown}; choose from {list(CLASSES)}")
    langs = set(languages) if languages is not None else None
    kept: list[Stamp] = []
    per_class: Counter = Counter()
    for stamp in stamps:
        if wanted is not None and stamp.label not in wanted:
            continue
        clips = {lang: path for lang, path in stamp.clips.items() if langs is None or lang in langs}
        if not clips or (limit > 0 and per_class[stamp.label] >= limit):
            continue
        per_class[stamp.label] += 1
        kept.append(Stamp(stamp.key, stamp.image, stamp.caption, clips))
    return kept


def _plan(stamps: list[Stamp], test_fraction: float) -> dict[str, dict[str, dict]]:
    """split -> sample id -> meta record (with source paths under '_image' and '_sound')."""
    splits: dict[str, dict[str, dict]] = {"train": {}, "test": {}}
    test = pick_test_stamps(stamps, test_fraction)
    for stamp in stamps:
        split = "test" if stamp.key in test else "train"
        for lang, clip in sorted(stamp.clips.items()):
            splits[split][sample_id(stamp.key, lang)] = {
                "class": stamp.label,
                "stamp": stamp.key,
                "language": lang,
                "caption": stamp.caption,
                "image": f"vision/{stamp.label}/{sample_id(stamp.key, lang)}.png",
                "sound": f"sound/{stamp.label}/{sample_id(stamp.key, lang)}{clip.suffix}",
                "_image": stamp.image,
                "_sound": clip,
            }
    return splits


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _stats(splits: dict[str, dict[str, dict]], skipped: Counter) -> dict:
    stats: dict = {}
    for split, samples in splits.items():
        records = list(samples.values())
        stats[split] = {
            "samples": len(records),
            "stamps": len({r["stamp"] for r in records}),
            "classes": dict(sorted(Counter(r["class"] for r in records).items())),
            "languages": dict(sorted(Counter(r["language"] for r in records).items())),
        }
    stats["skipped"] = dict(sorted(skipped.items()))
    return stats


def _listed_files(out_dir: Path) -> Iterable[Path]:
    """Every image and clip the meta.json files of a build refer to."""
    for split in ("train", "test"):
        meta = json.loads((out_dir / split / "meta.json").read_text(encoding="utf-8"))
        for record in meta.values():
            yield out_dir / split / record["image"]
            yield out_dir / split / record["sound"]


def _readme(version: str, stats: dict) -> str:
    mapping = "\n".join(f"  {src:<18} -> {dst}" for src, dst in sorted(CLASS_MAP.items()))
    lines = [
        "Tux Paint stamps as an image + spoken-description classification dataset (ADVANCE layout).",
        "Built by `fedmml data prepare tuxpaint`.",
        "",
        f"Source: Debian package {PACKAGE} {version}, files under {STAMPS_DIR}.",
        f"License: {LICENSE}. This folder holds copies of those files; keep it out of version control",
        "and redistribute it only under the GPL (see /usr/share/doc/tuxpaint-stamps-default/copyright).",
        "",
        "One sample per (stamp PNG, spoken description <stamp>_desc_<lang>.ogg); the image is hard-linked",
        "across a stamp's languages. SVG-only stamps and _mirror variants are skipped. Train/test split by",
        "stamp, stratified by class (sha256 of its path), so no picture is in both splits. meta.json maps",
        "sample id -> class, stamp, language ('en' for <stamp>_desc.ogg), English caption and files.",
        "",
        "Class = source folder (longest prefix):",
        mapping,
        "",
        f"Samples: train {stats['train']['samples']} ({stats['train']['stamps']} stamps), "
        f"test {stats['test']['samples']} ({stats['test']['stamps']} stamps).",
        "",
    ]
    return "\n".join(lines)


def _place(src: Path, dest: Path, links: dict[Path, Path]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    first = links.get(src)
    if first is not None:
        try:
            os.link(first, dest)  # one stamp image per language: share the bytes instead of copying
            return
        except OSError:
            pass  # filesystem without hard links: fall back to a copy
    shutil.copyfile(src, dest)
    links.setdefault(src, dest)


def _write(staging: Path, splits: dict[str, dict[str, dict]], readme: str, info: dict, say: Progress) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    links: dict[Path, Path] = {}
    for split, samples in splits.items():
        (staging / split / "vision").mkdir(parents=True, exist_ok=True)
        (staging / split / "sound").mkdir(parents=True, exist_ok=True)
        for n, record in enumerate(samples.values()):
            if n and n % 1000 == 0:
                say(f"{split}: {n}/{len(samples)} samples written")
            _place(record["_image"], staging / split / record["image"], links)
            sound = staging / split / record["sound"]
            sound.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record["_sound"], sound)
        (staging / split / "meta.json").write_bytes(dump_json({k: _public(r) for k, r in samples.items()}))
    (staging / "README.txt").write_text(readme, encoding="utf-8")
    # Written last: its presence marks a complete build.
    (staging / "prepare.json").write_bytes(dump_json(info))


def prepare_tuxpaint(
    out_dir: Path,
    test_fraction: float = 0.2,
    classes: Iterable[str] | None = None,
    languages: Iterable[str] | None = None,
    limit: int = 0,
    stamps_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Write <out_dir>/{train,test}/{vision,sound}/<class>/<id>.*, meta.json, prepare.json; return stats."""
    out_dir = Path(out_dir).resolve()
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if limit < 0:
        raise ValueError(f"limit (stamps per class) must be >= 0, got {limit}")
    say = progress or (lambda _msg: None)
    stamps_dir = Path(stamps_dir) if stamps_dir is not None else STAMPS_DIR
    version = package_version() if stamps_dir == STAMPS_DIR else "unknown"
    config = {
        "format": FORMAT,
        "package_version": version,
        "stamps_dir": str(stamps_dir),
        "test_fraction": test_fraction,
        "classes": sorted(set(classes)) if classes is not None else None,
        "languages": sorted(set(languages)) if languages is not None else None,
        "limit": limit,
    }
    # Check the source first, so a missing package is reported even when out_dir looks prepared.
    stamps, skipped = find_stamps(stamps_dir)
    stats = stored_stats(out_dir, config, _listed_files)
    if stats is not None:
        say(f"{out_dir} is already prepared")
        return stats
    check_owned(out_dir, "tuxpaint")

    stamps = _select(stamps, config["classes"], config["languages"], limit)
    splits = _plan(stamps, test_fraction)
    if not splits["train"] or not splits["test"]:
        raise PrepareError(f"selection leaves an empty split ({len(stamps)} stamps); select more stamps")
    stats = _stats(splits, skipped)
    info = {
        "dataset": "tuxpaint",
        "config": config,
        "source": {"package": PACKAGE, "version": version, "license": LICENSE},
        "class_map": CLASS_MAP,
        "stats": stats,
    }
    staging = staging_dir(out_dir)
    total = stats["train"]["samples"] + stats["test"]["samples"]
    say(f"writing {total} samples from {len(stamps)} stamps to {out_dir}")
    _write(staging, splits, _readme(version, stats), info, say)
    swap_in(staging, out_dir)
    say(
        f"prepared {stats['train']['samples']} train and {stats['test']['samples']} test samples in {out_dir}"
    )
    return stats
