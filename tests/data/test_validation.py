"""Validation splits: the folder's own, or identities carved out of train; the test split is never read."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from fedmml.config import ConfigError, load_config
from fedmml.data.partition import carve
from fedmml.tasks import task_for

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], str | Path):
        _opened.append(str(Path(args[0]).resolve()))


sys.addaudithook(_audit)


def _cfg(root: Path, preset: str = "tiny", *extra: str):
    return load_config(preset, [f'data.root="{root}"', 'eval.split="val"', *extra])


def test_carving_keeps_every_identity_on_one_side() -> None:
    identities = [f"e{i // 3}" for i in range(3000)]  # 1,000 identities, three samples each
    val = carve(identities, 0.1)
    assert {identities[i] for i in val}.isdisjoint(identities[i] for i in set(range(3000)) - set(val))
    assert 70 <= len({identities[i] for i in val}) <= 130  # a tenth, up to the binomial spread (3 sd)
    assert carve(identities[:300], 0.1) == [i for i in val if i < 300]  # a subset carves the same way


def test_a_carved_validation_split_on_emoji_identities(emoji_root: Path) -> None:
    global _opened
    cfg = _cfg(emoji_root, "tiny", "data.limit_train=0", "data.limit_test=0")
    task = task_for(cfg)
    train = task.train_index(cfg, str(emoji_root))
    _opened = []
    try:
        split, val = task.held_out(cfg, str(emoji_root))
        held_out = task.load_held_out(cfg)
    finally:
        opened, _opened = _opened, None
    assert split == "train" and len(held_out) == len(val) > 0
    assert set(val.identities).isdisjoint(train.identities)
    assert all(i.startswith("unified=") for i in val.identities)  # an emoji in every vendor style
    whole = task.read_index(cfg, str(emoji_root), "train", 0)
    assert len(train) + len(val) == len(whole)
    assert str((emoji_root / "captions_test.json").resolve()) not in opened


def test_a_training_limit_leaves_the_validation_split_whole(emoji_root: Path) -> None:
    # A limit on the training data (a quick tuning grid) must not shrink the split that ranks its points:
    # the carve is cut before the limit, which then draws from the rest, each category keeping its share.
    whole_cfg = _cfg(emoji_root, "emoji")
    cfg = _cfg(emoji_root, "emoji", "data.limit_train=1000")
    task = task_for(cfg)
    _, val = task.held_out(cfg, str(emoji_root))
    _, whole_val = task.held_out(whole_cfg, str(emoji_root))
    train = task.train_index(cfg, str(emoji_root))
    assert val.image_ids == whole_val.image_ids and len(val) > 200
    assert len(train) == 1000 and set(train.identities).isdisjoint(val.identities)
    rest = task.train_index(whole_cfg, str(emoji_root))
    assert set(train.image_ids) <= set(rest.image_ids)
    assert len(set(task.labels(train))) == len(set(task.labels(rest)))
    # limit_test limits the validation split as it does the test split.
    _, small = task.held_out(_cfg(emoji_root, "emoji", "data.limit_test=50"), str(emoji_root))
    assert len(small) == 50 and set(small.image_ids) <= set(val.image_ids)


def test_a_folder_with_its_own_validation_split(emoji_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "emoji"
    root.mkdir()
    (root / "images").symlink_to(emoji_root / "images")
    train = json.loads((emoji_root / "captions_train.json").read_text())
    cut = len(train["images"]) // 10
    val_ids = {im["id"] for im in train["images"][:cut]}
    for name, images in (("val", train["images"][:cut]), ("train", train["images"][cut:])):
        ids = {im["id"] for im in images}
        notes = [a for a in train["annotations"] if a["image_id"] in ids]
        (root / f"captions_{name}.json").write_text(json.dumps({"images": images, "annotations": notes}))
    shutil.copy(emoji_root / "captions_test.json", root)
    cfg = _cfg(root, "emoji")
    task = task_for(cfg)
    split, val = task.held_out(cfg, str(root))
    assert split == "val" and set(val.image_ids) == val_ids
    assert len(task.train_index(cfg, str(root))) == len(train["images"]) - cut  # nothing carved
    # The same emoji in another vendor style on both sides is refused, naming it.
    (root / "captions_val.json").write_text(
        json.dumps({"images": train["images"][: cut + 1], "annotations": train["annotations"]})
    )
    shared = train["images"][cut]["unified"]
    with pytest.raises(ConfigError, match=f"shares 1 identities with train: unified={shared}"):
        task.held_out(cfg, str(root))


def test_an_empty_carve_is_one_line(emoji_root: Path) -> None:
    cfg = _cfg(emoji_root, "tiny", "data.val_fraction=0.00001")  # below one hash bucket in 10,000
    with pytest.raises(ConfigError, match="the validation split is empty: data.val_fraction = 1e-05"):
        task_for(cfg).held_out(cfg, str(emoji_root))
    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \(0, 1\)"):
        _cfg(emoji_root, "tiny", "data.val_fraction=1.0")


def test_image_audio_carves_whole_stamps(tuxpaint_root: Path) -> None:
    cfg = _cfg(tuxpaint_root, "tiny-av", "data.limit_train=0", "data.val_fraction=0.3")
    task = task_for(cfg)
    _, val = task.held_out(cfg, str(tuxpaint_root))
    train = task.train_index(cfg, str(tuxpaint_root))
    assert len(val) and all(i.startswith("stamp=") for i in val.identities)
    assert set(val.identities).isdisjoint(train.identities)
