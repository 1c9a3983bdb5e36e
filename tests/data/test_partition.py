"""Client partitions via flwr-datasets, and the seeded stratified subsets that data limits take."""

import random
from collections import Counter

import pytest

from fedmml.data.partition import describe, partition, stratified_subset

LABELS = random.Random(0).choices("abcdefgh", k=1200)


def assert_exact_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_cover_reproducible_and_seeded(kind: str) -> None:
    labels = LABELS if kind == "dirichlet" else len(LABELS)
    a = partition(labels, 7, kind, seed=0)
    assert len(a) == 7
    assert_exact_cover(a, len(LABELS))
    assert a == partition(labels, 7, kind, seed=0)
    assert a != partition(labels, 7, kind, seed=1)
    assert sum(describe(a, LABELS)["sizes"]) == len(LABELS)


def test_iid_is_shuffled_and_balanced() -> None:
    parts = partition(100, 4, "iid", seed=0)
    assert [len(p) for p in parts] == [25, 25, 25, 25]
    assert parts[0] != list(range(25))


def test_dirichlet_alpha_controls_skew() -> None:
    skewed = describe(partition(LABELS, 10, "dirichlet", alpha=0.1, seed=0), LABELS)
    even = describe(partition(LABELS, 10, "dirichlet", alpha=100.0, seed=0), LABELS)
    assert skewed["mean_label_entropy"] < even["mean_label_entropy"] - 0.5
    assert skewed["min_size"] >= 2


def test_dirichlet_errors() -> None:
    with pytest.raises(ValueError, match="needs a label for every sample"):
        partition(["a", None, "b", "a"], 2, "dirichlet")
    with pytest.raises(ValueError, match="fewer clients"):
        partition(LABELS[:30], 10, "dirichlet", alpha=0.01, min_partition_size=3)
    with pytest.raises(ValueError, match="cannot split"):
        partition(3, 5, "iid")


def test_a_limited_subset_keeps_every_label_share_and_its_seed() -> None:
    labels = ["b"] * 30 + ["a"] * 50 + [None] * 20
    subset = stratified_subset(labels, 10, seed=0)
    assert subset == sorted(subset) and len(set(subset)) == 10
    assert Counter(labels[i] for i in subset) == {"a": 5, "b": 3, None: 2}
    assert stratified_subset(labels, 10, seed=0) == subset
    assert stratified_subset(labels, 10, seed=1) != subset
    # Shares that do not divide evenly: the largest remainders get the rest, the total is exact.
    assert Counter(labels[i] for i in stratified_subset(labels, 7, seed=0)) == {"a": 4, "b": 2, None: 1}
    assert stratified_subset(labels, 0) == stratified_subset(labels, 500) == list(range(100))


@pytest.mark.parametrize("preset", ["tiny", "tiny-av"])
def test_no_preset_evaluates_on_a_single_class(preset: str, request: pytest.FixtureRequest) -> None:
    from fedmml.config import load_config
    from fedmml.tasks import task_for

    root = request.getfixturevalue("emoji_root" if preset == "tiny" else "tuxpaint_root")
    cfg = load_config(preset, [f'data.root="{root}"'])
    task = task_for(cfg)
    for split, limit in (("test", cfg.data.limit_test), ("train", cfg.data.limit_train)):
        got = Counter(task.labels(task.read_index(cfg, str(root), split, limit)))
        whole = Counter(task.labels(task.read_index(cfg, str(root), split, 0)))
        n = min(limit, whole.total())
        assert got.total() == n and len(got) > 1, (split, got)
        for label, count in whole.items():  # each label's share of the slice, rounded down or up
            assert abs(got[label] - n * count / whole.total()) < 1, (split, label)
