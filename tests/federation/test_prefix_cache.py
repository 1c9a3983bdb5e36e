"""The frozen-prefix cache: exact with deterministic preprocessing, honest in its accounting, may refuse."""

from pathlib import Path

import pytest
import torch

from fedmml.config import load_config
from fedmml.experiment import build_setup
from fedmml.federation.prefix_cache import CacheShelf, RowStore, cache_starts
from fedmml.methods import configure, frozen_modules, plan_stages
from fedmml.models.build import build_model

pytestmark = pytest.mark.slow  # several short training runs per test; `make test-fast` skips it

# Three stages (1, 2, 2 rounds): stages 2 and 3 train from the cache, stage 2's second round reuses it.
ROUNDS = "schedules.uniform.rounds=[1, 2, 2]"
STEPS = 192 // 3 // 16  # per client and round on tiny: 192 images over 3 clients, batch 16
TEST_IMAGES = 96


def _run(emoji_root: Path, *extra: str) -> list[dict]:
    cfg = load_config(
        "tiny",
        [f'data.root="{emoji_root}"', 'run.method="lw"', ROUNDS, "eval.every=0", "run.threads=1", *extra],
    )
    return build_setup(cfg).run_rounds()


@pytest.fixture(scope="module")
def uncached(emoji_root: Path) -> list[dict]:
    return _run(emoji_root, "cache.frozen_prefix=false")


@pytest.fixture(scope="module")
def cached(emoji_root: Path) -> list[dict]:
    return _run(emoji_root)


def _losses(metrics: list[dict]) -> list[float]:
    return [m["train_loss"] for m in metrics]


def test_cache_gives_the_same_losses(cached: list[dict], uncached: list[dict], same_trajectory) -> None:
    same_trajectory(_losses(cached), _losses(uncached), STEPS)
    # Rounding may swap two nearly tied similarities: at most one rank, 100 / TEST_IMAGES points of R@K.
    assert cached[-1]["rsum"] == pytest.approx(uncached[-1]["rsum"], abs=100 / TEST_IMAGES)
    # The same tensors travel; only the replies' metadata (the cache size) is a few bytes longer.
    for with_cache, without in zip(cached, uncached, strict=True):
        assert 0 <= with_cache["bytes_up"] - without["bytes_up"] <= 32 * len(with_cache["clients"])


def test_the_loss_check_catches_a_slightly_wrong_cache(
    emoji_root: Path, uncached: list[dict], different_trajectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cached rows 0.1 % off (far less than a wrong row, block or stage would be) must fail the check that
    # test_cache_gives_the_same_losses makes.
    get = RowStore.get
    monkeypatch.setattr(RowStore, "get", lambda self, position: get(self, position) * 1.001)
    different_trajectory(_losses(_run(emoji_root)), _losses(uncached), STEPS)


def test_cache_is_accounted(cached: list[dict], uncached: list[dict]) -> None:
    stage = [m["stage"] for m in cached]
    assert stage == [1, 2, 2, 3, 3]
    # Stage 1 trains the stems, so nothing is frozen yet; later stages hold a cache.
    assert cached[0]["client_cache_bytes"] == 0 and all(m["client_cache_bytes"] > 0 for m in cached[1:])
    assert all(m["client_cache_bytes"] == 0 for m in uncached)
    # The prefix is never run in training, so a round that reuses the cache costs less; the round that fills
    # it pays the fill pass (every caption of every image, once) on top of that.
    for later in (2, 4):
        assert cached[later]["client_flops"] < uncached[later]["client_flops"]
        assert cached[later]["client_flops"] < cached[later - 1]["client_flops"]
    # Frozen weights are not part of a cached client's working memory.
    assert cached[-1]["client_peak_mem_bytes"] < uncached[-1]["client_peak_mem_bytes"]
    assert cached[0]["client_peak_mem_bytes"] == uncached[0]["client_peak_mem_bytes"]


def test_disk_store_is_exact_and_float16_is_close(emoji_root: Path, cached: list[dict]) -> None:
    disk = _run(emoji_root, 'cache.store="disk"')
    assert _losses(disk) == _losses(cached)  # the same rows, only stored elsewhere: the same arithmetic
    device = _run(emoji_root, 'cache.store="device"')  # on a CPU the device's memory is host RAM
    assert _losses(device) == _losses(cached)
    half = _run(emoji_root, 'cache.dtype="float16"')
    assert half[-1]["client_cache_bytes"] * 2 == cached[-1]["client_cache_bytes"]
    assert _losses(half) == pytest.approx(_losses(cached), rel=0.05)  # rounding, then training drifts


def test_a_cache_over_its_bound_falls_back(emoji_root: Path, uncached: list[dict]) -> None:
    small = _run(emoji_root, "cache.max_mib=0.01")
    assert _losses(small) == _losses(uncached)  # no cache: the very same computation
    assert all(m["client_cache_bytes"] == 0 for m in small)
    assert "bound of 0 MiB" in next(iter(small[1]["cache_notes"].values()))


def test_augmented_views(emoji_root: Path, same_trajectory, different_trajectory) -> None:
    plain = _run(emoji_root, "data.augment=true", "cache.frozen_prefix=false")
    # Views of epochs 0..7 cover every epoch of this run (rounds 1-5, one epoch each): exact.
    covered = _run(emoji_root, "data.augment=true", "cache.views=8")
    same_trajectory(_losses(covered), _losses(plain), STEPS)
    # One view: every epoch reuses epoch 0's crops, so the later steps see other crops than without a cache.
    single = _run(emoji_root, "data.augment=true", "cache.views=1")
    different_trajectory(_losses(single), _losses(plain), STEPS)
    assert single[-1]["client_cache_bytes"] < covered[-1]["client_cache_bytes"]


def test_shelf_refills_when_frozen_tensors_change(emoji_root: Path) -> None:
    cfg = load_config("tiny", [f'data.root="{emoji_root}"'])
    setup = build_setup(cfg)
    model = setup.workspace.model
    stages = plan_stages(cfg.active_schedule, "lw", {m: e.total_blocks for m, e in model.encoders.items()})
    stage = stages[1]
    setup.workspace.at_depth(stage.depth)
    shelf = CacheShelf()
    client = setup.clients[0]
    args = (client.cid, model, "lw", stage, cfg, client.dataset, client.indices)
    first = shelf.get(*args, frozen_received=[])
    assert first is not None and shelf.get(*args, frozen_received=[]) is first
    # Tensors of the cached prefix itself arrived (a node that lost them): fill again from scratch.
    stem_key = next(k for k in model.state_dict() if k.startswith("encoders.image.stem."))
    again = shelf.get(*args, frozen_received=[stem_key])
    assert again is not None and again is not first and again.fill_flops >= first.fill_flops
    # Next stage: the rows go through the newly frozen blocks only, which is cheaper than a fill.
    deeper_stage = stages[2]
    setup.workspace.at_depth(deeper_stage.depth)
    new_blocks = [k for k in model.state_dict() if k.startswith("encoders.image.blocks.2.")]
    deeper = shelf.get(client.cid, model, "lw", deeper_stage, cfg, client.dataset, client.indices, new_blocks)
    assert deeper is not None and deeper.starts == {"image": 4, "text": 2}
    assert 0 < deeper.fill_flops < again.fill_flops
    fresh = CacheShelf().get(client.cid, model, "lw", deeper_stage, cfg, client.dataset, client.indices, [])
    for m in ("image", "text"):
        for p in range(len(fresh.stores[m])):
            torch.testing.assert_close(deeper.stores[m].get(p), fresh.stores[m].get(p), atol=1e-5, rtol=1e-5)
    assert shelf.get(client.cid, model, "prog", stage, cfg, client.dataset, client.indices, []) is None
    shelf.close()


def test_cached_suffix_equals_the_full_forward() -> None:
    cfg = load_config("tiny")
    model = build_model(cfg.model, load_weights=False).eval()
    stages = plan_stages(cfg.active_schedule, "lw", {m: e.total_blocks for m, e in model.encoders.items()})
    stage = stages[2]
    for m, d in stage.depth.items():
        model.encoders[m].grow_to(d)
    configure(model, "lw", stage)
    starts = cache_starts(model, "lw", stage)
    assert starts == {"image": 4, "text": 2}
    assert frozen_modules(model, "lw", stage)  # stems and earlier blocks
    texts = ["a cat", "two red apples on a table", "a dog"]
    batch = {"image": torch.rand(3, 3, 32, 32), "text": texts}
    with torch.no_grad():
        full = model.features(batch)
        for m, enc in model.encoders.items():
            hidden, context = enc.forward_prefix(model.inputs(m, batch[m]), starts[m])
            rows = enc.unbatch(hidden, context)
            if m == "text":  # padding is dropped per text and restored per batch
                assert [len(r) for r in rows] == model.inputs("text", texts)["attention_mask"].sum(1).tolist()
            # Rows are rebatched in another order, as a cache serves them.
            again, ctx = enc.rebatch(rows[::-1])
            out = enc.forward_suffix(again, ctx, starts[m])
            torch.testing.assert_close(out.flip(0), full[m], atol=1e-5, rtol=1e-5)
