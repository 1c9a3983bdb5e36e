"""CaptionDataset on a small hand-made COCO-format folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from fedmml.data.coco import CaptionDataset, DatasetNotFound, collate_train, read_caption_index


def make_coco(root: Path) -> Path:
    """Five listed images: 1-3 good, 4 truncated, 5 good but without any valid caption."""
    (root / "images").mkdir(parents=True)
    colours = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 5: (9, 9, 9)}
    for image_id, colour in colours.items():
        Image.new("RGB", (40, 30), colour).save(root / "images" / f"{image_id}.png")
    full = (root / "images" / "1.png").read_bytes()
    (root / "images" / "4.png").write_bytes(full[: len(full) // 2])
    images = [{"id": i, "file_name": f"{i}.png"} for i in (3, 1, 2, 4, 5)]
    images[0]["category"] = "blue"
    annotations = [
        {"id": 1, "image_id": 1, "caption": "a red square"},
        {"id": 2, "image_id": 1, "caption": "red"},
        {"id": 3, "image_id": 1, "caption": "crimson block"},
        {"id": 4, "image_id": 2, "caption": "  a green square "},
        {"id": 5, "image_id": 3, "caption": "a blue square"},
        {"id": 6, "image_id": 4, "caption": "unreadable"},
        {"id": 7, "image_id": 5, "caption": None},  # bad
        {"id": 8, "caption": "no image id"},  # no image
        {"id": 9, "image_id": 99, "caption": "unknown image"},  # no image
        {"id": 10, "image_id": 2, "caption": "   "},  # bad
    ]
    (root / "captions_train.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


@pytest.fixture()
def coco(tmp_path: Path) -> Path:
    return make_coco(tmp_path / "coco")


def test_skips_are_counted(coco: Path) -> None:
    ds = CaptionDataset(coco, "train", image_size=16)
    assert ds.skipped == {
        "bad_image_entry": 0,
        "bad_caption": 2,
        "caption_without_image": 2,
        "unreadable_image": 1,
        "image_without_caption": 1,
    }
    assert ds.image_ids == [1, 2, 3]
    assert len(ds) == 3
    assert ds.captions == [["a red square", "red", "crimson block"], ["a green square"], ["a blue square"]]
    assert ds.labels == [None, None, "blue"]


def test_a_caption_of_an_unlisted_image_is_counted_once(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "1.png")
    annotations = [
        {"id": 1, "image_id": 1, "caption": "a black square"},
        {"id": 2, "image_id": 7, "caption": "an image the file does not list"},
    ]
    images = [{"id": 1, "file_name": "1.png"}]
    (root / "captions_train.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    skipped = CaptionDataset(root, "train", image_size=8).skipped
    assert skipped["caption_without_image"] == 1
    assert skipped["bad_caption"] == 0 and skipped["image_without_caption"] == 0


def test_train_draws_one_caption_deterministically_per_epoch(coco: Path) -> None:
    ds = CaptionDataset(coco, "train", image_size=16, train=True, seed=3)
    pixels, caption = ds[0]
    assert pixels.shape == (3, 16, 16) and isinstance(caption, str)
    assert ds[0][1] == caption  # same seed, epoch and index
    per_epoch = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        per_epoch.append(ds[0][1])
    assert set(per_epoch) == set(ds.captions[0])  # different epochs draw different captions
    other = CaptionDataset(coco, "train", image_size=16, train=True, seed=3)
    other.set_epoch(11)
    assert other[0][1] == per_epoch[11]


def test_augmentation_is_seeded(coco: Path) -> None:
    ds = CaptionDataset(coco, "train", image_size=16, augment=True, seed=1)
    a, _ = ds[1]
    assert torch.equal(a, ds[1][0]) and a.shape == (3, 16, 16)


def test_eval_returns_all_captions(coco: Path) -> None:
    ds = CaptionDataset(coco, "train", image_size=8, train=False)
    pixels, captions = ds[0]
    assert captions == ["a red square", "red", "crimson block"]
    assert torch.allclose(pixels[0], torch.ones(8, 8)) and torch.allclose(pixels[1], -torch.ones(8, 8))


def test_limit_and_collate_with_subset(coco: Path) -> None:
    # A limit is a seeded subset in which each category keeps its share: image 3, the one "blue" of four
    # captioned images, is in every 3-image subset (3/4 rounds up), and the subset repeats.
    index = read_caption_index(coco, "train", limit=3)
    assert len(index) == 3 and 3 in index.image_ids and index.image_ids == sorted(index.image_ids)
    assert read_caption_index(coco, "train", limit=3).image_ids == index.image_ids
    limited = CaptionDataset(coco, "train", image_size=16, limit=3)
    assert limited.image_ids == [i for i in index.image_ids if i != 4]  # 4 is truncated: skipped
    ds = CaptionDataset(coco, "train", image_size=16)
    assert ds.image_ids == [1, 2, 3]
    loader = DataLoader(Subset(ds, [1, 0]), batch_size=2, collate_fn=collate_train)
    batch = next(iter(loader))
    pixels, captions = batch["image"], batch["text"]
    assert pixels.shape == (2, 3, 16, 16) and captions[0] == "a green square"


def test_missing_root_or_split(tmp_path: Path, coco: Path) -> None:
    with pytest.raises(DatasetNotFound, match="fedmml data prepare emoji") as err:
        CaptionDataset(tmp_path / "nowhere", "train")
    assert "nowhere" in str(err.value) and isinstance(err.value, FileNotFoundError)
    assert "data.root" in str(err.value)
    with pytest.raises(DatasetNotFound, match="captions_test.json"):
        CaptionDataset(coco, "test")


def test_custom_captions_file_and_images_dir(coco: Path) -> None:
    (coco / "images").rename(coco / "pics")
    (coco / "captions_train.json").rename(coco / "caps.json")
    ds = CaptionDataset(coco, "val", images_dir="pics", captions_file="caps.json", train=False)
    assert len(ds) == 3
    assert np.array_equal(ds.images.read(ds.file_names[0])[0, 0], [255, 0, 0])
