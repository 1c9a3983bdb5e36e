"""Build the default emoji image-caption dataset (COCO captions layout) from emoji-datasource npm packages."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from fedmml.cache import cache_dir
from fedmml.data.prepare.output import (
    PrepareError,
    check_owned,
    dump_json,
    staging_dir,
    stored_stats,
    swap_in,
)

VERSION = "16.0.0"
VENDORS = ("google", "twitter")
FORMAT = 1  # bump when the output layout or captions change, so old folders are rebuilt
IMAGE_LICENSES = {
    "google": "Apache-2.0 (Noto Emoji by Google, https://github.com/googlefonts/noto-emoji)",
    "twitter": "CC-BY-4.0 (Twemoji by Twitter, Inc and other contributors, https://github.com/twitter/twemoji)",
}
METADATA_LICENSE = "MIT (emoji-data by Cal Henderson, https://github.com/iamcal/emoji-data)"
EXCLUDED_CATEGORIES = ("Component",)  # bare skin-tone and hair swatches, not depictable objects

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    """Where downloaded npm tarballs are kept between runs."""
    return cache_dir("npm")


def package_name(vendor: str) -> str:
    """The npm package holding one vendor's emoji images."""
    return f"emoji-datasource-{vendor}"


def fetch_tarball(vendor: str, cache_dir: Path) -> Path:
    """Download emoji-datasource-<vendor>@VERSION with `npm pack` unless it is already cached."""
    dest = cache_dir / f"{package_name(vendor)}-{VERSION}.tgz"
    if dest.is_file():
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise PrepareError(
            f"npm is needed to download {package_name(vendor)}@{VERSION} but was not found on PATH; "
            f"install Node.js/npm, or place the tarball at {dest}"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    spec = f"{package_name(vendor)}@{VERSION}"
    cmd = [npm, "pack", spec, "--pack-destination", str(cache_dir)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise PrepareError(f"could not run {' '.join(cmd)}: {err}") from err
    if result.returncode != 0 or not dest.is_file():
        detail = (result.stderr or result.stdout).strip()[-2000:]
        raise PrepareError(f"`npm pack {spec}` failed (exit {result.returncode}): {detail}")
    return dest


def read_tarball(path: Path, vendor: str) -> tuple[list[dict], dict[str, bytes], dict]:
    """Stream one package tarball once: emoji.json entries, 64 px PNG bytes by name, package.json."""
    prefix = f"package/img/{vendor}/64/"
    entries: list[dict] | None = None
    meta: dict = {}
    pngs: dict[str, bytes] = {}
    try:
        # Streaming mode reads the 60-75 MB archive sequentially without extracting the sprite sheets.
        with tarfile.open(path, mode="r|gz") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                name = member.name
                wanted = name in ("package/emoji.json", "package/package.json")
                if not wanted and not (name.startswith(prefix) and name.endswith(".png")):
                    continue
                handle = archive.extractfile(member)
                data = handle.read() if handle is not None else b""
                if name == "package/emoji.json":
                    entries = json.loads(data)
                elif name == "package/package.json":
                    meta = json.loads(data)
                else:
                    pngs[name[len(prefix) :]] = data
    except (OSError, tarfile.TarError, EOFError, json.JSONDecodeError) as err:
        raise PrepareError(f"cannot read {path} ({err}); delete it to download it again") from err
    if entries is None:
        raise PrepareError(f"{path} has no package/emoji.json; is it an emoji-datasource tarball?")
    if not pngs:
        raise PrepareError(f"{path} has no 64 px images for vendor {vendor!r}")
    return entries, pngs, meta


def is_test_emoji(unified: str, test_fraction: float) -> bool:
    """Whether an emoji (by code point sequence, so in every vendor style) belongs to the test split."""
    bucket = int(hashlib.sha256(unified.upper().encode("ascii")).hexdigest(), 16) % 10_000
    return bucket < round(test_fraction * 10_000)


def readable_caption(name: str) -> str:
    """Lowercase an emoji name and normalise punctuation (e.g. 'RESCUE WORKER’S HELMET')."""
    return " ".join(name.replace("\u2019", "'").lower().split())


def _captions(entries: Iterable[dict]) -> dict[str, str]:
    """Caption per unified code; names shared by several emoji fall back to their short name."""
    entries = list(entries)
    counts = Counter(readable_caption(e["name"]) for e in entries)
    # emoji.json 16.0 names both 1F935 and its male variant 'MAN IN TUXEDO'; short names tell them apart.
    return {
        e["unified"]: readable_caption(e["name"])
        if counts[readable_caption(e["name"])] == 1
        else readable_caption(e["short_name"].replace("_", " "))
        for e in entries
    }


def _png_size(data: bytes) -> tuple[int, int]:
    # Width and height live in the IHDR chunk at a fixed offset; avoids decoding thousands of images.
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return (0, 0)
    return struct.unpack(">II", data[16:24])


def _config(vendors: tuple[str, ...], test_fraction: float) -> dict:
    return {"format": FORMAT, "version": VERSION, "vendors": list(vendors), "test_fraction": test_fraction}


def _listed_files(out_dir: Path) -> Iterable[Path]:
    """Every image the captions files of a build refer to."""
    for split in ("train", "test"):
        data = json.loads((out_dir / f"captions_{split}.json").read_text(encoding="utf-8"))
        yield from (out_dir / "images" / img["file_name"] for img in data["images"])


def _readme(vendors: tuple[str, ...], versions: Mapping[str, str], stats: dict) -> str:
    lines = [
        "Emoji image-caption dataset for fedmml (COCO captions layout).",
        "Built by `fedmml data prepare emoji`.",
        "",
        "Sources (npm):",
    ]
    for vendor in vendors:
        lines.append(f"  {package_name(vendor)}@{versions[vendor]}: images {IMAGE_LICENSES[vendor]}")
    lines += [
        f"  emoji metadata (names, categories) from emoji.json: {METADATA_LICENSE}",
        "",
        "Attribution: Twemoji graphics by Twitter, Inc and other contributors, licensed under",
        "CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/).",
        "Noto Emoji images by Google, licensed under Apache-2.0.",
        "",
        "One 64x64 PNG per (emoji, vendor); skin-tone variants and the 'Component' category are excluded.",
        "Caption: the lowercased Unicode emoji name. Train/test split by emoji identity (sha256 of the",
        "unified code), so no emoji appears in both splits in any vendor style.",
        "",
        f"Images: train {stats['train']['images']}, test {stats['test']['images']}.",
        "",
    ]
    return "\n".join(lines)


Sources = dict[str, tuple[dict[str, dict], dict[str, bytes]]]  # vendor -> (entries by unified, PNGs by name)


def _collect(sources: Sources, vendors: tuple[str, ...], test_fraction: float) -> tuple[dict, list, Counter]:
    """COCO images/annotations per split, the PNG files to write, and per-vendor missing-image counts."""
    # The per-vendor emoji.json files are identical copies; merge by identity in case they ever differ.
    merged: dict[str, dict] = {}
    for vendor in vendors:
        for unified, entry in sources[vendor][0].items():
            merged.setdefault(unified, entry)
    ordered = sorted(merged.values(), key=lambda e: (e.get("sort_order", 0), e["unified"]))
    ordered = [e for e in ordered if e.get("category") not in EXCLUDED_CATEGORIES]
    captions = _captions(ordered)

    splits: dict[str, dict[str, list]] = {s: {"images": [], "annotations": []} for s in ("train", "test")}
    files: list[tuple[str, bytes]] = []
    missing: Counter = Counter()
    for entry in ordered:
        split = "test" if is_test_emoji(entry["unified"], test_fraction) else "train"
        for vendor in vendors:
            vendor_entry = sources[vendor][0].get(entry["unified"])
            png = sources[vendor][1].get(entry["image"]) if vendor_entry else None
            if not vendor_entry or not vendor_entry.get(f"has_img_{vendor}") or png is None:
                missing[vendor] += 1
                continue
            image_id = len(files) + 1  # ids run across both splits so they never collide
            file_name = f"{vendor}/{entry['image']}"
            width, height = _png_size(png)
            splits[split]["images"].append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": width,
                    "height": height,
                    "vendor": vendor,
                    "unified": entry["unified"],
                    "short_name": entry.get("short_name"),
                    "category": entry.get("category"),
                    "subcategory": entry.get("subcategory"),
                }
            )
            splits[split]["annotations"].append(
                {"id": image_id, "image_id": image_id, "caption": captions[entry["unified"]]}
            )
            files.append((file_name, png))
    return splits, files, missing


def _stats(splits: dict, missing: Counter, vendors: tuple[str, ...]) -> dict:
    stats: dict = {}
    for split, data in splits.items():
        images = data["images"]
        stats[split] = {
            "images": len(images),
            "emojis": len({img["unified"] for img in images}),
            "vendors": dict(sorted(Counter(img["vendor"] for img in images).items())),
            "categories": dict(sorted(Counter(img["category"] for img in images).items())),
        }
    stats["skipped_no_image"] = {v: missing[v] for v in vendors}
    return stats


def _write(staging: Path, splits: dict, files: list[tuple[str, bytes]], readme: str, info: dict) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    for file_name, png in files:
        path = staging / "images" / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    for split, data in splits.items():
        header = {"description": f"emoji captions ({split}) from emoji-datasource {VERSION}", "split": split}
        (staging / f"captions_{split}.json").write_bytes(dump_json({"info": header, **data}))
    (staging / "README.txt").write_text(readme, encoding="utf-8")
    # Written last: its presence marks a complete build.
    (staging / "prepare.json").write_bytes(dump_json(info))


def prepare_emoji(
    out_dir: Path,
    vendors: Iterable[str] = VENDORS,
    test_fraction: float = 0.2,
    cache_dir: Path | None = None,
    tarballs: Mapping[str, Path] | None = None,
    progress: Progress | None = None,
) -> dict:
    """Write images/<vendor>/*.png, captions_{train,test}.json, prepare.json and README.txt; return stats."""
    # Absolute, so the staging folder next to it is well defined even for "." or "data/".
    out_dir = Path(out_dir).resolve()
    vendors = tuple(sorted(set(vendors)))
    unknown = [v for v in vendors if v not in IMAGE_LICENSES]
    if not vendors or unknown:
        raise ValueError(f"unsupported emoji vendors {unknown or '[]'}; choose from {list(IMAGE_LICENSES)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    say = progress or (lambda _msg: None)
    config = _config(vendors, test_fraction)
    stats = stored_stats(out_dir, config, _listed_files)
    if stats is not None:
        say(f"{out_dir} is already prepared")
        return stats
    check_owned(out_dir, "emoji")

    tarballs = dict(tarballs or {})
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sources: Sources = {}
    versions: dict[str, str] = {}
    for vendor in vendors:
        if vendor in tarballs:
            path = Path(tarballs[vendor])
            if not path.is_file():
                raise PrepareError(f"tarball for {vendor!r} not found: {path}")
        else:
            say(f"fetching {package_name(vendor)}@{VERSION} into {cache_dir}")
            path = fetch_tarball(vendor, cache_dir)
        say(f"reading {path.name}")
        entries, pngs, meta = read_tarball(path, vendor)
        sources[vendor] = ({e["unified"]: e for e in entries}, pngs)
        versions[vendor] = str(meta.get("version", "unknown"))

    splits, files, missing = _collect(sources, vendors, test_fraction)
    stats = _stats(splits, missing, vendors)
    info = {
        "dataset": "emoji",
        "config": config,
        "sources": {
            vendor: {
                "package": package_name(vendor),
                "version": versions[vendor],
                "images": IMAGE_LICENSES[vendor],
            }
            for vendor in vendors
        },
        "metadata_license": METADATA_LICENSE,
        "stats": stats,
    }
    staging = staging_dir(out_dir)
    say(f"writing {len(files)} images to {out_dir}")
    _write(staging, splits, files, _readme(vendors, versions, stats), info)
    swap_in(staging, out_dir)
    say(f"prepared {stats['train']['images']} train and {stats['test']['images']} test images in {out_dir}")
    return stats
