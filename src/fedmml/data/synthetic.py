"""A COCO-2017-shaped folder of synthetic photographs, for measuring what grows with a dataset's size.

The images are 640x480 JPEGs with the statistics that set their decoding cost and file size (smooth colour
fields, hard-edged shapes, fine texture and sensor noise; about 125 KB each, COCO's average is about 160 KB)
but no real content: 1,000 distinct ones, repeated. Five captions per image are drawn from a small
vocabulary. Written in parallel, once: files that exist are kept. Three layouts: fedmml's, the official
release's, and a Hugging Face dataset's Parquet files as the Hub lays them out (``layout = "hf"``).
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT = 640, 480
WORDS = (
    "a man woman dog cat bus train plate of food on table street with people sitting next to red blue".split()
)


def synth_jpeg(seed: int, quality: int = 90) -> bytes:
    """One photograph-like 640x480 JPEG, determined by ``seed``."""
    rng = np.random.default_rng(seed)
    field = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    im = Image.fromarray(field).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(6, 14))):
        x, y = rng.integers(0, WIDTH), rng.integers(0, HEIGHT)
        w, h = rng.integers(20, 240), rng.integers(20, 200)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(1.0))
    pixels = np.asarray(im, dtype=np.int16)
    texture = rng.normal(0, 11, (HEIGHT, WIDTH, 1)) + rng.normal(0, 4, (HEIGHT, WIDTH, 3))
    pixels = np.clip(pixels + texture, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


# Distinct images drawn; file i holds image i % POOL, so a 118k folder is written in minutes, not hours.
POOL = 1000


def image_path(root: Path, layout: str, train: int, i: int) -> Path:
    """Where image ``i`` lies: ``images/`` (fedmml's layout) or ``train2017/`` / ``val2017/`` (the official
    release's, ids from ``train`` on being the test split)."""
    if layout == "coco":
        return root / "images" / f"{i:012d}.jpg"
    return root / ("train2017" if i < train else "val2017") / f"{i:012d}.jpg"


def _draw(args: tuple[Path, str, int, int, int]) -> None:
    root, layout, train, start, stop = args
    for i in range(start, stop):
        path = image_path(root, layout, train, i)
        if not path.exists():
            path.write_bytes(synth_jpeg(i))


def _copy(args: tuple[Path, str, int, int, int]) -> None:
    root, layout, train, start, stop = args
    pool: dict[int, bytes] = {}
    for i in range(start, stop):
        path = image_path(root, layout, train, i)
        if not path.exists():
            if i % POOL not in pool:
                pool[i % POOL] = image_path(root, layout, train, i % POOL).read_bytes()
            path.write_bytes(pool[i % POOL])


def _captions(rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, int(rng.integers(8, 14)))) for _ in range(5)]


def write_folder(
    root: Path, train: int, test: int, workers: int = 0, layout: str = "coco", images: bool = True
) -> Path:
    """``root`` with ``train`` and ``test`` images (ids 0..train-1 train, the next ``test`` test) and five
    captions each, in fedmml's layout (``layout = "coco"``: images/, captions_{train,test}.json), the
    official MS-COCO 2017 one (``"coco2017"``: train2017/, val2017/,
    annotations/captions_{train,val}2017.json) or a Hugging Face dataset's (``"hf"``: see :func:`write_hf`);
    without ``images`` only the captions files."""
    if layout == "hf":
        if not images:
            raise ValueError(
                "a Hugging Face dataset holds its images in its rows: it cannot be captions-only"
            )
        return write_hf(root, train, test, workers)
    if layout not in ("coco", "coco2017"):
        raise ValueError(f"layout must be coco, coco2017 or hf, not {layout!r}")
    total = train + test
    for i in (0, total - 1):
        image_path(root, layout, train, i).parent.mkdir(parents=True, exist_ok=True)
    drawn = min(POOL, total)
    jobs = [(root, layout, train, s, min(s + 50, drawn)) for s in range(0, drawn, 50)]
    copies = [(root, layout, train, s, min(s + 2000, total)) for s in range(drawn, total, 2000)]
    if images:
        with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
            list(pool.map(_draw, jobs))
            list(pool.map(_copy, copies))
    rng = np.random.default_rng(0)
    for split, ids in (("train", range(train)), ("test", range(train, total))):
        if layout == "coco":
            path = root / f"captions_{split}.json"
        else:
            path = root / "annotations" / f"captions_{'train' if split == 'train' else 'val'}2017.json"
            path.parent.mkdir(exist_ok=True)
        if path.exists():
            continue
        records = [{"id": i, "file_name": f"{i:012d}.jpg", "width": WIDTH, "height": HEIGHT} for i in ids]
        notes = [{"image_id": i, "caption": c} for i in ids for c in _captions(rng)]
        path.write_text(json.dumps({"images": records, "annotations": notes}))
    return root


# The Hub's Parquet layout for image datasets: shards of at most about 500 MB, row groups of 100 rows.
SHARD_ROWS = 4000
GROUP_ROWS = 100


def write_hf(root: Path, train: int, test: int, workers: int = 0) -> Path:
    """``root/data/{train,test}-0000i-of-0000n.parquet``, as ``push_to_hub`` writes an image-caption dataset:
    an ``image`` column of ``datasets.Image``'s ``{bytes, path}`` (the JPEGs whole), ``captions`` (five
    strings) and ``image_id``. Shards that exist are kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        images = list(pool.map(synth_jpeg, range(min(POOL, train + test)), chunksize=50))
    rng = np.random.default_rng(0)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, first, count in (("train", 0, train), ("test", train, test)):
        shards = max(1, -(-count // SHARD_ROWS))
        for shard in range(shards):
            path = root / "data" / f"{split}-{shard:05d}-of-{shards:05d}.parquet"
            ids = range(first + shard * SHARD_ROWS, first + min(count, (shard + 1) * SHARD_ROWS))
            captions = [_captions(rng) for _ in ids]  # drawn for kept shards too: the same captions on rerun
            if path.exists():
                continue
            table = pa.table(
                {
                    "image": pa.array(
                        [{"bytes": images[i % POOL], "path": f"{i:012d}.jpg"} for i in ids], image_type
                    ),
                    "captions": captions,
                    "image_id": list(ids),
                }
            )
            pq.write_table(table, path.with_suffix(".tmp"), row_group_size=GROUP_ROWS)
            path.with_suffix(".tmp").rename(path)
    return root
