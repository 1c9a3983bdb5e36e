"""Client partitions via flwr-datasets."""

import random

import pytest

from fedmml.data.partition import describe, partition

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
