"""Image decoding and augmentation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmml.data.images import UnreadableImage, load_image, random_resized_crop, to_tensor


def test_rgba_is_composited_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4, :, :] = (255, 0, 0, 255)  # opaque red top half, transparent bottom half
    rgba[4:, :, :] = (0, 0, 255, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (255, 0, 0)
    assert tuple(img[7, 7]) == (255, 255, 255)


def test_half_transparent_la_and_palette(tmp_path: Path) -> None:
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 1] = 128  # black at half alpha over white -> mid grey
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert abs(int(load_image(tmp_path / "la.png")[0, 0, 0]) - 127) <= 1

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png")
    assert tuple(img[0, 0]) == (10, 200, 30) and tuple(img[3, 3]) == (255, 255, 255)


def test_unreadable_images_raise_with_path(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    for path in (truncated, garbage, tmp_path / "missing.png"):
        with pytest.raises(UnreadableImage, match=path.name):
            load_image(path)
    assert issubclass(UnreadableImage, ValueError)


def test_to_tensor_resizes_and_normalises() -> None:
    img = np.zeros((10, 20, 3), dtype=np.uint8)
    img[..., 0] = 255
    x = to_tensor(img, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))


def test_random_resized_crop_shape_and_determinism() -> None:
    img = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    a = random_resized_crop(img, 32, rng=np.random.default_rng(1))
    b = random_resized_crop(img, 32, rng=np.random.default_rng(1))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    # Impossible scale forces the centre-crop fallback.
    c = random_resized_crop(img, 20, scale=(5.0, 6.0), rng=np.random.default_rng(2))
    assert c.shape == (20, 20, 3)
