"""Emoji dataset preparation on the real emoji-datasource tarballs (fetched once by conftest's fixture)."""

import json
from pathlib import Path

import pytest

from fedmml.data.coco import CaptionDataset
from fedmml.data.prepare.emoji import VERSION, prepare_emoji


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, emoji_tarballs: dict[str, Path]) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("emoji") / "emoji"
    return out, prepare_emoji(out, tarballs=emoji_tarballs)


def load(out: Path, split: str) -> dict:
    return json.loads((out / f"captions_{split}.json").read_text(encoding="utf-8"))


def test_splits_disjoint_by_identity_across_vendors(both: tuple[Path, dict]) -> None:
    out, stats = both
    train, test = load(out, "train"), load(out, "test")
    train_ids = {img["unified"] for img in train["images"]}
    test_ids = {img["unified"] for img in test["images"]}
    assert train_ids and test_ids and not train_ids & test_ids
    train_caps = {a["caption"] for a in train["annotations"]}
    assert not train_caps & {a["caption"] for a in test["annotations"]}
    for split, data in (("train", train), ("test", test)):
        vendors = {v: sum(img["vendor"] == v for img in data["images"]) for v in ("google", "twitter")}
        assert stats[split]["vendors"] == vendors
        assert vendors["google"] > 0 and vendors["twitter"] > 0
    assert 0.15 < stats["test"]["emojis"] / (stats["train"]["emojis"] + stats["test"]["emojis"]) < 0.25
    image_ids = [img["id"] for data in (train, test) for img in data["images"]]
    assert len(set(image_ids)) == len(image_ids)
    categories = {img["category"] for data in (train, test) for img in data["images"]}
    assert "Component" not in categories and "Smileys & Emotion" in categories


def test_captions_and_images(both: tuple[Path, dict]) -> None:
    out, _ = both
    images = [img for split in ("train", "test") for img in load(out, split)["images"]]
    annotations = [a for split in ("train", "test") for a in load(out, split)["annotations"]]
    captions = {a["image_id"]: a["caption"] for a in annotations}
    grin = [img for img in images if img["unified"] == "1F601"]
    assert {img["file_name"] for img in grin} == {"google/1f601.png", "twitter/1f601.png"}
    assert {captions[img["id"]] for img in grin} == {"grinning face with smiling eyes"}
    all_caps = list(captions.values())
    assert all(c == c.strip().lower() and c for c in all_caps)
    assert "united arab emirates flag" in all_caps
    assert not any("\u2019" in c for c in all_caps)
    # emoji.json names two emoji 'MAN IN TUXEDO'; the neutral one falls back to its short name.
    assert {"man in tuxedo", "person in tuxedo"} <= set(all_caps)
    assert len(set(all_caps)) == len(all_caps) // 2  # one caption per emoji, shared by both vendors
    assert not any("1f3fb" in img["file_name"] for img in images)  # no skin-tone variants
    assert all((out / "images" / img["file_name"]).is_file() for img in images)
    ds = CaptionDataset(out, "test", train=False, limit=8)
    assert len(ds) == 8 and ds.labels[0] is not None and ds.skipped["unreadable_image"] == 0


def test_idempotent_and_deterministic(
    emoji_tarballs: dict[str, Path], both: tuple[Path, dict], tmp_path: Path
) -> None:
    out, stats = both
    before = (out / "captions_train.json").stat().st_mtime_ns
    assert prepare_emoji(out, tarballs=emoji_tarballs) == stats
    assert (out / "captions_train.json").stat().st_mtime_ns == before  # nothing rewritten
    again = tmp_path / "again"
    prepare_emoji(again, tarballs=emoji_tarballs)
    for name in ("captions_train.json", "captions_test.json", "prepare.json", "README.txt"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    info = json.loads((out / "prepare.json").read_text())
    assert (
        info["sources"]["twitter"]["version"] == VERSION
        and "CC-BY-4.0" in info["sources"]["twitter"]["images"]
    )


def test_one_vendor_keeps_the_same_split(
    emoji_tarballs: dict[str, Path], both: tuple[Path, dict], tmp_path: Path
) -> None:
    out, stats = both
    google = prepare_emoji(tmp_path / "g", vendors=("google",), tarballs={"google": emoji_tarballs["google"]})
    assert google["test"]["emojis"] == stats["test"]["emojis"]
    assert set(google["test"]["vendors"]) == {"google"}
    test_ids = {img["unified"] for img in load(tmp_path / "g", "test")["images"]}
    assert test_ids == {img["unified"] for img in load(out, "test")["images"]}


def test_refuses_foreign_folder(emoji_tarballs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="not an earlier `fedmml data prepare emoji` output"):
        prepare_emoji(tmp_path / "mine", tarballs=emoji_tarballs)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def fake_npm(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir()
    script = bin_dir / "npm"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)


def test_fetch_uses_npm_pack_once(
    emoji_tarballs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in npm: `npm pack <spec> --pack-destination <dir>` copies the cached tarball and logs the call.
    log = tmp_path / "calls.txt"
    fake_npm(tmp_path / "bin", f'echo "$@" >> {log}\ncp {emoji_tarballs["google"]} "$4"/\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + ":/usr/bin:/bin")
    messages: list[str] = []
    cache = tmp_path / "cache"
    prepare_emoji(tmp_path / "a", vendors=("google",), cache_dir=cache, progress=messages.append)
    prepare_emoji(tmp_path / "b", vendors=("google",), cache_dir=cache)
    assert log.read_text().splitlines() == [
        f"pack emoji-datasource-google@{VERSION} --pack-destination {cache}"
    ]
    assert any("fetching" in m for m in messages)


def test_npm_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_npm(tmp_path / "bin", "echo 'E404 not found' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RuntimeError, match="npm pack emoji-datasource-google.*E404"):
        prepare_emoji(tmp_path / "out", vendors=("google",), cache_dir=tmp_path / "cache")


def test_missing_npm_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    with pytest.raises(RuntimeError, match="npm"):
        prepare_emoji(tmp_path / "out", vendors=("google",), cache_dir=tmp_path / "cache")
