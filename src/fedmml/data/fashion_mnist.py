"""Fashion-MNIST from the Debian package dataset-fashion-mnist, for zero-shot classification checks.

Images are kept as stored: a light garment on a black background (no inversion), replicated to three
channels and normalised like every other image in fedmml (mean 0.5, std 0.5).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedmml.data.images import MEAN, STD

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def available(root: Path = FASHION_MNIST_ROOT) -> bool:
    """Whether the test split files are present (apt-get install dataset-fashion-mnist)."""
    return all((Path(root) / name).is_file() for name in _FILES["test"])


def _read_idx(path: Path, magic: int, header: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Raw uint8 payload and big-endian dimensions of a gzipped IDX file."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = np.frombuffer(raw[4:header], dtype=">u4").astype(int)
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path} is not an IDX file of the expected type (magic {found}, expected {magic})")
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: {data.size} bytes for dimensions {tuple(dims)}")
    return data, tuple(dims)


def load_raw(root: Path = FASHION_MNIST_ROOT, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and int64 labels [N] of one split."""
    root = Path(root)
    image_file, label_file = _FILES[split]
    if not (root / image_file).is_file() or not (root / label_file).is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found in {root}; "
            "install them with `apt-get install dataset-fashion-mnist`"
        )
    images, dims = _read_idx(root / image_file, _IMAGES_MAGIC, header=16)
    labels, _ = _read_idx(root / label_file, _LABELS_MAGIC, header=8)
    # frombuffer views are read-only; copy so callers can hand them to torch.from_numpy safely.
    return images.reshape(dims).copy(), labels.astype(np.int64)


def balanced_subset(labels: np.ndarray, limit: int, num_classes: int = len(CLASSES)) -> np.ndarray:
    """Indices of the first limit // num_classes samples of each class (the first limit % num_classes
    classes get one more), in file order."""
    quota = [limit // num_classes + (1 if c < limit % num_classes else 0) for c in range(num_classes)]
    chosen = [np.flatnonzero(labels == c)[: quota[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def load_test(
    root: Path = FASHION_MNIST_ROOT, limit: int = 0, image_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Test images as normalised float pixels [N, 3, S, S] and class indices [N] (limit>0: class-balanced)."""
    images, labels = load_raw(root, "test")
    if limit > 0:
        keep = balanced_subset(labels, limit)
        images, labels = images[keep], labels[keep]
    # Same PIL bilinear resize and normalisation as the image-caption datasets, done on the single grey
    # channel (3x cheaper) and replicated afterwards.
    if image_size != images.shape[-1]:
        size = (image_size, image_size)
        images = np.stack(
            [np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR)) for img in images]
        )
    grey = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    return grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels)
