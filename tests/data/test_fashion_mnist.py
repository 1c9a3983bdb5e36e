"""Fashion-MNIST from the Debian package (skipped when it is not installed)."""

import pytest
import torch

from fedmml.data import fashion_mnist

pytestmark = pytest.mark.skipif(
    not fashion_mnist.available(), reason="apt package dataset-fashion-mnist not installed"
)


def test_balanced_limit_shapes() -> None:
    pixels, labels = fashion_mnist.load_test(limit=50, image_size=32)
    assert pixels.shape == (50, 3, 32, 32) and pixels.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.bincount(minlength=10).tolist() == [5] * 10
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert torch.equal(pixels[:, 0], pixels[:, 2])  # grey replicated to three channels


def test_full_split_metadata() -> None:
    images, labels = fashion_mnist.load_raw()
    assert images.shape == (10_000, 28, 28)
    assert labels.tolist().count(0) == 1000 and len(fashion_mnist.CLASSES) == 10
