"""Image decoding, augmentation and tensor conversion with PIL and numpy only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

MEAN = 0.5
STD = 0.5


class UnreadableImage(ValueError):
    """An image file that PIL cannot decode (corrupt, truncated or not an image)."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Flatten transparency onto white so emoji-style RGBA images keep their look."""
    if im.mode == "P":
        # Palette images may carry transparency in info; RGBA conversion honours it.
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | Path | BinaryIO, name: str = "") -> np.ndarray:
    """Decode an image file (a path, or a file object named ``name`` in errors) to a uint8 RGB array
    [H, W, 3]."""
    try:
        with Image.open(path) as im:
            # load() forces the full decode so truncated files fail here, not later.
            im.load()
            rgb = _to_rgb(im)
    except Exception as err:
        # Broad on purpose: decoders raise OSError, SyntaxError, zlib.error, struct.error, ...
        raise UnreadableImage(f"cannot read image {name or path}: {err}") from err
    return np.asarray(rgb, dtype=np.uint8).copy()


def to_tensor(img: np.ndarray, size: int) -> torch.Tensor:
    """Resize (bilinear) to size x size and normalise to [-1, 1] as a float tensor [3, size, size]."""
    im = Image.fromarray(img)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = (arr - MEAN) / STD
    # Imported here: the image store's worker processes decode with this module and need no PyTorch (its
    # import costs each worker seconds).
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def random_resized_crop(
    img: np.ndarray,
    size: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Crop a random area/aspect window and resize it to size x size (torchvision RandomResizedCrop)."""
    rng = rng if rng is not None else np.random.default_rng()
    height, width = img.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:
        # Fallback as in torchvision: the largest centred crop whose aspect lies within ratio.
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    top, left, h, w = box
    crop = Image.fromarray(img[top : top + h, left : left + w])
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
