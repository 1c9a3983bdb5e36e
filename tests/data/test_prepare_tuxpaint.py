"""Tux Paint preparation on a small real subset of the Debian package (installed by `make install`)."""

import json
from pathlib import Path

import pytest

from fedmml.data.advance import AdvanceDataset
from fedmml.data.audio import FbankSettings
from fedmml.data.prepare.tuxpaint import (
    CLASSES,
    STAMPS_DIR,
    PrepareError,
    TuxPaintNotInstalled,
    find_stamps,
    prepare_tuxpaint,
)

pytestmark = pytest.mark.skipif(
    not STAMPS_DIR.is_dir(),
    reason="tuxpaint-stamps-default not installed: apt-get install -y --no-install-recommends "
    "tuxpaint-stamps-default (make install does this as root)",
)
SUBSET = {"classes": ["space", "hobbies_sports"], "languages": ["fr", "ru", "en"], "limit": 6}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tux") / "tuxpaint"
    return out, prepare_tuxpaint(out, **SUBSET)


def meta(out: Path, split: str) -> dict:
    return json.loads((out / split / "meta.json").read_text(encoding="utf-8"))


def test_full_package_scan() -> None:
    stamps, skipped = find_stamps()
    assert 700 < len(stamps) < 850 and {s.label for s in stamps} == set(CLASSES) and len(CLASSES) == 12
    assert skipped["svg_only"] > 100 and skipped["mirror_variant"] > 0 and skipped["unknown_category"] == 0
    badger = next(s for s in stamps if s.key == "animals/mammals/badger")
    assert badger.caption == "A badger." and {"en", "fr", "ru"} <= set(badger.clips)
    assert badger.image.suffix == ".png" and badger.clips["en"].name == "badger_desc.ogg"
    assert next(s for s in stamps if s.key.startswith("symbols/alphabets/")).label == "letters"


def test_disjoint_split_by_stamp(small: tuple[Path, dict]) -> None:
    out, stats = small
    train, test = meta(out, "train"), meta(out, "test")
    train_stamps = {r["stamp"] for r in train.values()}
    test_stamps = {r["stamp"] for r in test.values()}
    assert train_stamps and test_stamps and not train_stamps & test_stamps
    assert len(train_stamps | test_stamps) == 12  # limit: 6 stamps in each of 2 classes
    for split, records in (("train", train), ("test", test)):
        assert stats[split]["samples"] == len(records)
        assert {r["class"] for r in records.values()} == {"space", "hobbies_sports"}
        assert {r["language"] for r in records.values()} <= {"fr", "ru", "en"}
        for sample_id, record in records.items():
            assert sample_id.endswith(f"__{record['language']}")
            assert (out / split / record["image"]).is_file() and (out / split / record["sound"]).is_file()
    info = json.loads((out / "prepare.json").read_text())
    assert info["source"]["package"] == "tuxpaint-stamps-default" and "GPL" in info["source"]["license"]


def test_loads_as_advance_dataset(small: tuple[Path, dict]) -> None:
    out, stats = small
    ds = AdvanceDataset(out, "test", image_size=32, settings=FbankSettings(max_frames=256))
    assert len(ds) == stats["test"]["samples"] and sum(ds.skipped.values()) == 0
    assert ds.classes == ["hobbies_sports", "space"]
    assert set(ds.groups) <= {"fr", "ru", "en"} and None not in ds.groups
    pixels, features, label = ds[0]
    assert pixels.shape == (3, 32, 32) and features.shape == (256, 128) and label in (0, 1)


def test_idempotent_and_deterministic(small: tuple[Path, dict], tmp_path: Path) -> None:
    out, stats = small
    before = (out / "prepare.json").stat().st_mtime_ns
    assert prepare_tuxpaint(out, **SUBSET) == stats
    assert (out / "prepare.json").stat().st_mtime_ns == before  # nothing rewritten
    again = tmp_path / "again"
    prepare_tuxpaint(again, **SUBSET)
    for name in ("train/meta.json", "test/meta.json", "prepare.json", "README.txt"):
        assert (out / name).read_bytes() == (again / name).read_bytes()


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(TuxPaintNotInstalled, match="apt-get install"):
        prepare_tuxpaint(tmp_path / "out", stamps_dir=tmp_path / "missing")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(PrepareError, match="not an earlier `fedmml data prepare tuxpaint` output"):
        prepare_tuxpaint(tmp_path / "mine", **SUBSET)
    with pytest.raises(ValueError, match="unknown Tux Paint classes"):
        prepare_tuxpaint(tmp_path / "x", classes=["dinosaurs"])
