"""Secure aggregation's arithmetic without a protocol: what a client sends, and how the server takes the mean
back into FedAvg and DP-FedAvg (the SecAgg+ runs themselves: tests/engines/test_secure_aggregation.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmml.federation.aggregate import RunningMean, fedavg
from fedmml.federation.payload import Message, PayloadError, pack
from fedmml.federation.privacy import PrivateSum
from fedmml.federation.secure import COUNTER_SPAN, SecureRound, changes, client_arrays, fold

START = {"b.weight": torch.zeros(2, 2), "a.num_batches_tracked": torch.tensor(10)}


def _reply(update: dict[str, torch.Tensor], samples: int, unclipped: bool = True) -> Message:
    meta = {"cid": 0, "num_samples": samples, "train_loss": 1.0, "unclipped": unclipped}
    return Message(meta, pack(changes(update, START)))


def _mean(arrays: list[list[np.ndarray]], weights: list[int]) -> list[np.ndarray]:
    """What the protocol gives back, without its rounding: sum(w x) / sum(w)."""
    return [
        sum(w * a[i] for a, w in zip(arrays, weights, strict=True)) / sum(weights)
        for i in range(len(arrays[0]))
    ]


def test_a_client_sends_flat_changes_a_scaled_counter_and_its_bit_and_no_bit_in_the_clear() -> None:
    update = {"b.weight": torch.full((2, 2), 0.25), "a.num_batches_tracked": torch.tensor(13)}
    spec = {"weighted": False, "count_unclipped": True, "range": 0.5}
    arrays, weight, header = client_arrays(_reply(update, 7, unclipped=False), spec)
    # Sorted by name: the counter (a.*) first, scaled into the range; then the weights' change; then the bit.
    assert [a.shape for a in arrays] == [(1,), (4,), (1,)]
    assert arrays[0][0] == pytest.approx(3 * 0.5 / COUNTER_SPAN)
    assert np.all(arrays[1] == 0.25) and arrays[2][0] == 0.0
    assert weight == 1 and "unclipped" not in header and header["num_samples"] == 7
    _, weight, _ = client_arrays(_reply(update, 7), {**spec, "weighted": True, "count_unclipped": False})
    assert weight == 7


def test_a_client_whose_update_is_not_finite_leaves_the_sum() -> None:
    update = {
        "b.weight": torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]),
        "a.num_batches_tracked": torch.tensor(11),
    }
    with pytest.raises(PayloadError, match="not finite"):
        client_arrays(_reply(update, 3), {"weighted": True, "count_unclipped": False, "range": 1.0})


def test_the_mean_folds_into_fedavg_as_the_updates_would() -> None:
    updates = [
        ({"b.weight": torch.full((2, 2), 0.5), "a.num_batches_tracked": torch.tensor(14)}, 3),
        ({"b.weight": torch.full((2, 2), -0.1), "a.num_batches_tracked": torch.tensor(12)}, 1),
    ]
    spec = {"weighted": True, "count_unclipped": False, "range": 1.0}
    sent = [client_arrays(_reply(u, n), spec) for u, n in updates]
    secure = SecureRound(sorted(START), 4, True, False, 1.0, max_weight=3)
    secure.mean = _mean([a for a, _, _ in sent], [w for _, w, _ in sent])
    acc = RunningMean()
    fold(secure, [_reply(u, n) for u, n in updates], START, acc)
    expected = fedavg(updates)
    for key, value in acc.result().items():
        assert value.dtype == expected[key].dtype
        assert torch.allclose(value, expected[key]), key


def test_the_mean_folds_into_dp_fedavg_as_the_sum_and_the_count() -> None:
    updates = [
        {"b.weight": torch.full((2, 2), 0.2), "a.num_batches_tracked": torch.tensor(13)},
        {"b.weight": torch.full((2, 2), 0.1), "a.num_batches_tracked": torch.tensor(13)},
        {"b.weight": torch.full((2, 2), 0.3), "a.num_batches_tracked": torch.tensor(13)},
    ]
    bits = [True, False, True]
    spec = {"weighted": False, "count_unclipped": True, "range": 0.7}
    replies = [_reply(u, 5, b) for u, b in zip(updates, bits, strict=True)]
    sent = [client_arrays(r, spec) for r in replies]
    secure = SecureRound(sorted(START), 4, False, True, 0.7)
    secure.mean = _mean([a for a, _, _ in sent], [1, 1, 1])
    acc = PrivateSum(0.7)
    fold(secure, replies, START, acc)
    assert acc.clients == 3 and acc.unclipped == 2
    assert torch.allclose(acc.sums["b.weight"], torch.full((2, 2), 0.6, dtype=torch.float64))
    assert acc.integers.result()["a.num_batches_tracked"] == 13
