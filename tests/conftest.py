"""Shared fixtures: offline Hugging Face, real emoji data fetched through npm once and cached."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread in the test process and in every process it starts (Flower's included). The tests
# train tiny models, which two threads do not speed up on an idle machine; on a busy one two threads spin
# against the other load: the fast tests took 385 s with two threads and 141 s with one while another run
# was training, and one tiny run inside them 147 s against 6 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from fedmml.data.prepare.emoji import default_cache_dir, fetch_tarball, prepare_emoji  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# Two float32 training runs that compute the same thing along different kernel paths (a cached frozen prefix
# against recomputing it) differ by rounding: ~1e-7 relative in the first steps' losses, and every optimizer
# step can amplify the difference in the weights (AdamW turns a rounding-sized gradient difference on a
# near-zero component into a different step of up to the learning rate). The tolerance on a round's mean loss
# therefore grows with the optimizer steps taken by then. Measured on the tiny preset (4 steps per round), on
# its two data slices so far (the first 192 images; since 2026-11-29 a category-stratified subset): rounding
# differences reach 2e-5 at round 5 without augmentation and 3.6e-4 with augmented views (one client's round
# jumping from 1e-7 to 1.5e-4: AdamW again); a 0.1 % error in cached rows gives 5.5e-4 at round 3, 1.1e-2 at
# round 4 and 3.2e-2 at round 5, float16-rounded rows 1.3e-3 at round 2, mismatched pairs 5e-2. Since the
# image store keeps augmented images at the short side crops need (46 px for tiny's 32), the augmented views'
# rounding reaches 9.9e-4 at round 5 (the refilled cache of stage 3 against recomputing): 5e-5 per step,
# still 30x below the 0.1 % error's 3.2e-2.
STEP_RTOL = 5e-5


def trajectory_mismatches(got: list[float], want: list[float], steps_per_round: int) -> list[int]:
    """Rounds (1-based) whose mean loss differs by more than float32 rounding after that many steps."""
    assert len(got) == len(want)
    return [
        r
        for r, (g, w) in enumerate(zip(got, want, strict=True), start=1)
        if g != pytest.approx(w, rel=STEP_RTOL * steps_per_round * r)
    ]


@pytest.fixture
def same_trajectory():
    """Check that two runs' per-round losses agree up to float32 rounding amplified by training."""

    def check(got: list[float], want: list[float], steps_per_round: int) -> None:
        bad = trajectory_mismatches(got, want, steps_per_round)
        assert not bad, f"losses differ beyond rounding in rounds {bad}: {got} vs {want}"

    return check


@pytest.fixture
def different_trajectory():
    """Check that two runs' per-round losses differ by more than rounding in at least one round."""

    def check(got: list[float], want: list[float], steps_per_round: int) -> None:
        assert trajectory_mismatches(got, want, steps_per_round), f"no round differs: {got} vs {want}"

    return check


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


@pytest.fixture(scope="session")
def client_folders(emoji_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny preset's three IID shares of the emoji data written out by ``fedmml data split`` as three
    disjoint client folders (``clients``), and a server folder (``server``) with only the test split."""
    from fedmml.config import load_config
    from fedmml.node_split import split_for_nodes

    base = tmp_path_factory.mktemp("federation") / "split"
    cfg = load_config("tiny", [f'data.root="{emoji_root}"'])
    written = split_for_nodes(cfg, cfg.federation.num_clients, base)
    return {
        "clients": [node["folder"] for node in written["nodes"]],
        "server": Path(written["server"]["folder"]),
    }
