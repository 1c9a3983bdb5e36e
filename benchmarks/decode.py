"""Per-image access cost of the ways a training sample can be read (issue 14's store decision).

Measures, on synthetic 640x480 photographs (fedmml.data.synthetic), the time to get one training-ready
uint8 array (short side >= the crop's need at 224 px) by: PIL on the source JPEG; PIL in draft (DCT-scaled)
mode; simplejpeg on the source; and from a prepared store (resized, re-encoded JPEG) read through a memory map
with PIL or simplejpeg, or through a Hugging Face ``datasets`` Arrow file; plus the bytes each keeps.

    .venv/bin/python benchmarks/decode.py --images 300
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from fedmml.data.synthetic import synth_jpeg

SIZE = 224
SIDE = math.ceil(SIZE / math.sqrt(0.5))  # the smallest crop (half the area) still needs no upsampling


def _resize_short(pixels: np.ndarray, side: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    scale = side / min(height, width)
    size = (round(width * scale), round(height * scale))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def pil_full(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return _resize_short(np.asarray(im.convert("RGB")), SIDE)


def pil_draft(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (SIDE, SIDE))
        return _resize_short(np.asarray(im.convert("RGB")), SIDE)


def simple(data: bytes) -> np.ndarray:
    return _resize_short(simplejpeg.decode_jpeg(data, min_height=SIDE, min_width=SIDE), SIDE)


def pil_plain(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def simple_plain(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data)


def _time(fn, items, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    sources = [synth_jpeg(i) for i in range(args.images)]
    stored = [simplejpeg.encode_jpeg(simple(s), quality=95) for s in sources]
    order = np.random.default_rng(0).permutation(args.images)
    rows = {
        "source, PIL": _time(pil_full, sources),
        "source, PIL draft": _time(pil_draft, sources),
        "source, simplejpeg (DCT-scaled)": _time(simple, sources),
    }
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "images.bin"
        blob.write_bytes(b"".join(stored))
        offsets = np.cumsum([0, *map(len, stored)])
        mapped = np.memmap(blob, dtype=np.uint8, mode="r")

        def from_store(i: int, decode) -> np.ndarray:
            return decode(mapped[offsets[i] : offsets[i + 1]].tobytes())

        rows["store (memmap), PIL"] = _time(lambda i: from_store(i, pil_plain), order)
        rows["store (memmap), simplejpeg"] = _time(lambda i: from_store(i, simple_plain), order)
        import datasets

        table = datasets.Dataset.from_dict(
            {"jpeg": stored}, features=datasets.Features({"jpeg": datasets.Value("binary")})
        )
        table.save_to_disk(str(Path(tmp) / "arrow"))
        arrow = datasets.load_from_disk(str(Path(tmp) / "arrow"))
        rows["store (HF datasets Arrow), simplejpeg"] = _time(
            lambda i: simple_plain(arrow[int(i)]["jpeg"]), order
        )
    result = {
        "images": args.images,
        "source_kib": round(np.mean([len(s) for s in sources]) / 1024, 1),
        "store_kib": round(np.mean([len(s) for s in stored]) / 1024, 1),
        "side": SIDE,
        "ms_per_image": {k: round(v * 1000, 2) for k, v in rows.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
