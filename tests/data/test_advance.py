"""The ADVANCE-layout loader on a hand-made folder with broken pairs, and the language partition."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmml.data.advance import AdvanceDataset, collate
from fedmml.data.audio import FbankSettings
from fedmml.data.coco import DatasetNotFound
from fedmml.data.partition import partition_by_group

SETTINGS = FbankSettings(max_frames=128)


def write_pair(root: Path, split: str, cls: str, sample: str, image: bool = True, sound: bool = True) -> None:
    import soundfile as sf

    if image:
        (root / split / "vision" / cls).mkdir(parents=True, exist_ok=True)
        shade = (len(sample) * 40) % 255
        Image.new("RGB", (20, 12), (shade, 10, 200)).save(root / split / "vision" / cls / f"{sample}.png")
    if sound:
        (root / split / "sound" / cls).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(len(sample))
        sf.write(root / split / "sound" / cls / f"{sample}.wav", 0.1 * rng.standard_normal(8000), 8000)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    root = tmp_path / "adv"
    for cls, ids in {"beach": ["a", "bb"], "forest": ["c", "dd", "eee"], "zoo": ["z"]}.items():
        for sample in ids:
            write_pair(root, "train", cls, sample)
    write_pair(root, "train", "forest", "no_image", image=False)
    write_pair(root, "train", "beach", "no_sound", sound=False)
    write_pair(root, "train", "beach", "bad_sound")
    wav = root / "train" / "sound" / "beach" / "bad_sound.wav"
    wav.write_bytes(wav.read_bytes()[:30])  # truncated inside the header
    write_pair(root, "train", "forest", "bad_image")
    (root / "train" / "vision" / "forest" / "bad_image.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "train" / "meta.json").write_text(json.dumps({"a": {"language": "fr"}, "c": {"language": "de"}}))
    write_pair(root, "test", "forest", "t1")
    write_pair(root, "test", "beach", "t2")
    return root


def test_pairs_labels_groups_and_skips(layout: Path) -> None:
    ds = AdvanceDataset(layout, "train", image_size=16, settings=SETTINGS)
    assert ds.classes == ["beach", "forest", "zoo"]
    assert ds.ids == ["a", "bb", "c", "dd", "eee", "z"]
    assert ds.labels == [0, 0, 1, 1, 1, 2] and ds.label_names[2] == "forest"
    assert ds.groups == ["fr", None, "de", None, None, None]
    assert ds.skipped == {
        "missing_image": 1,
        "missing_sound": 1,
        "unreadable_image": 1,
        "unreadable_sound": 1,
        "unknown_class": 0,
        "duplicate_id": 0,
    }
    pixels, features, label = ds[3]
    assert pixels.shape == (3, 16, 16) and features.shape == (128, 128) and label == 1
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["audio"].shape == (2, 128, 128)
    assert batch["labels"].tolist() == [0, 0]
    # The test split takes its class indices from train, even though it has no 'zoo' folder.
    test = AdvanceDataset(layout, "test", image_size=16, settings=SETTINGS)
    assert test.classes == ds.classes and test.ids == ["t2", "t1"] and test.labels == [0, 1]


def test_fbank_cache_is_reused_and_keyed_by_settings(layout: Path) -> None:
    first = AdvanceDataset(layout, "train", image_size=16, settings=SETTINGS)
    assert first.cache.misses == 7 and first.cache.hits == 0  # bad_image.png has a good clip
    cached = list((layout / ".cache" / f"fbank-{SETTINGS.key()}").glob("*.npy"))
    assert len(cached) == 7
    again = AdvanceDataset(layout, "train", image_size=16, settings=SETTINGS)
    assert again.cache.hits == 7 and again.cache.misses == 0
    assert all(torch.equal(first[i][1], again[i][1]) for i in range(len(first)))
    assert first.features == []  # read from the cache on access, not held
    other = AdvanceDataset(layout, "train", image_size=16, settings=FbankSettings(max_frames=64))
    assert other.cache.misses == 7 and other[0][1].shape == (64, 128)


def test_missing_root_names_prepare_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fedmml data prepare tuxpaint") as info:
        AdvanceDataset(tmp_path / "nope", "train")
    assert isinstance(info.value, DatasetNotFound)


def test_partition_by_group_whole_languages() -> None:
    groups = ["fr"] * 30 + ["ru"] * 25 + ["en"] * 5 + ["es"] * 20 + ["ml"] * 2 + ["da"] * 10
    parts = partition_by_group(groups, 3, seed=1)
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(groups)))  # every sample exactly once
    owners = {g: {c for c, part in enumerate(parts) for i in part if groups[i] == g} for g in set(groups)}
    assert all(len(clients) == 1 for clients in owners.values())  # whole languages
    assert sorted(len(p) for p in parts) == [30, 30, 32]
    assert partition_by_group(groups, 3, seed=1) == parts
    with pytest.raises(ValueError, match="6 groups"):
        partition_by_group(groups, 7)
    with pytest.raises(ValueError, match="every sample"):
        partition_by_group(["fr", None], 1)
