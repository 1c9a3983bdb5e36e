"""Shared fixtures: offline Hugging Face, real emoji data fetched through npm once and cached."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedmml.data.prepare.emoji import default_cache_dir, fetch_tarball, prepare_emoji  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def emoji_tarballs() -> dict[str, Path]:
    """The real emoji-datasource npm packages (npm pack, cached across runs)."""
    return {v: fetch_tarball(v, default_cache_dir()) for v in ("google", "twitter")}


@pytest.fixture(scope="session")
def emoji_root(tmp_path_factory: pytest.TempPathFactory, emoji_tarballs: dict[str, Path]) -> Path:
    """The emoji dataset in COCO format: the repository's data/emoji if prepared, else built here."""
    prepared = REPO / "data" / "emoji"
    if (prepared / "captions_train.json").exists():
        return prepared
    out = tmp_path_factory.mktemp("data") / "emoji"
    prepare_emoji(out, tarballs=emoji_tarballs)
    return out


@pytest.fixture(scope="session")
def tuxpaint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real subset of the Tux Paint stamps and their spoken descriptions (4 classes, 4 languages) in the
    ADVANCE layout, built from the Debian package; skips when the package is not installed."""
    from fedmml.data.prepare.tuxpaint import STAMPS_DIR, prepare_tuxpaint

    if not STAMPS_DIR.is_dir():
        pytest.skip("tuxpaint-stamps-default not installed (make install does this as root)")
    out = tmp_path_factory.mktemp("data") / "tuxpaint"
    subset = ["animals", "food", "vehicles", "space"]
    prepare_tuxpaint(out, classes=subset, languages=["fr", "ru", "es", "ca"], limit=12)
    return out
