"""Secure aggregation as the server and its clients see it, whatever protocol runs it (the Flower engines run
SecAgg+: fedmml.engines.flower.secure).

Each client of a round turns its update into one list of arrays: its change of every tensor it trained
(sorted by name; the change of an integer counter such as BatchNorm's num_batches_tracked scaled by
range / COUNTER_SPAN, so that up to that many steps a round fit the range), and under adaptive clipping a
last one-element array that holds the clipping range when the bound left the update whole, else 0, so that
the server learns only how many were. The protocol masks each list, weighted by the client's sample count
(FedAvg) or once each (under DP, as the accountant assumes), and the server learns sum(w_i x_i) / sum(w_i)
over the clients whose masked arrays arrived. Each client's reply header (sample count, training loss,
costs) still travels in the clear.

SecAgg+ clips every coordinate to +-range and rounds it stochastically to one of 2^22 levels. Under DP the
range is the clipping bound (no coordinate of a clipped change exceeds it) and the client clips to a bound
smaller by the largest rounding error, so that the rounded update, and so the sum's sensitivity, stays
within the bound the accountant assumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmml.config import PrivacyConfig
from fedmml.federation.aggregate import RunningMean
from fedmml.federation.payload import Message, PayloadError, unpack
from fedmml.federation.privacy import PrivateSum

LEVELS = 2**22  # SecAgg+'s quantisation levels (Flower's default quantization_range)
SECURE_BYTES_UP = "secure_bytes_up"  # in a reply header: what the client uploaded for the protocol
# A counter's change travels as change / COUNTER_SPAN of the range: a rounding error of 2 x COUNTER_SPAN /
# LEVELS = 1/32 of a count per client, whatever the range.
COUNTER_SPAN = 2**16


def changes(update: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's update as its change from what it started the round with, every tensor (a secure sum
    cannot take a counter's value and the others' changes apart)."""
    return {k: v - start[k] for k, v in update.items()}


def rounded_bound(bound: float, dims: int) -> float:
    """The bound a client clips to so that, once each of ``dims`` coordinates is rounded to a level of the
    range +-``bound`` (an error under one level, 2 x bound / LEVELS), the norm is at most ``bound``."""
    return bound * (1 - 2 * math.sqrt(dims) / LEVELS)


def describe(p: PrivacyConfig, private: bool) -> dict[str, Any]:
    """The run's secure aggregation, for summary.json and the report (``private``: under DP)."""
    return {
        "protocol": "SecAgg+ (Flower)",
        "shares": p.secagg_shares,
        "threshold": p.secagg_threshold,
        "levels": LEVELS,
        "range": "clip" if private else p.secagg_range,
    }


@dataclass
class SecureRound:
    """One round's secure sum: what the clients send, and what the protocol gave back."""

    keys: list[str]  # the update's tensors, in the order their arrays travel
    dims: int  # the update's float coordinates
    weighted: bool  # each client weighted by its sample count (FedAvg); else once each (DP)
    count_unclipped: bool  # adaptive clipping: the unclipped bit travels in the sum
    value_range: float  # each coordinate is clipped to +-this before quantising
    max_weight: int = 1  # the largest weight among the round's clients
    mean: list[np.ndarray] | None = None  # sum(w_i x_i) / sum(w_i), once the protocol has run

    def instruction(self) -> dict[str, Any]:
        """What a training message tells its client (``meta["secure"]``)."""
        return {"weighted": self.weighted, "count_unclipped": self.count_unclipped, "range": self.value_range}


def client_arrays(reply: Message, spec: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
    """A client's reply to a secure round (its blob: the change, see Client.handle; ``spec``: the
    instruction's ``meta["secure"]``) as the arrays to mask, its weight, and the header that travels in the
    clear (without the unclipped bit)."""
    meta = dict(reply.meta)
    unclipped = meta.pop("unclipped", True)
    tensors = unpack(reply.blob)
    scale = {False: spec["range"] / COUNTER_SPAN, True: 1.0}
    # Flat: Flower's unmasking leaves a 0-d array (a counter) unshifted and unscaled (flwr 1.42's dequantize
    # turns it into a numpy scalar, which its in-place steps then miss).
    arrays = [
        (tensors[k].double() * scale[tensors[k].is_floating_point()]).reshape(-1).numpy()
        for k in sorted(tensors)
    ]
    if not all(np.isfinite(a).all() for a in arrays):
        # The server cannot reject what it never sees: a NaN would turn into an arbitrary integer in the sum.
        raise PayloadError(f"client {meta.get('cid')}: its update is not finite, so it leaves the secure sum")
    if spec["count_unclipped"]:
        arrays.append(np.array([spec["range"] if unclipped else 0.0]))
    weight = int(meta["num_samples"]) if spec["weighted"] else 1
    return arrays, weight, meta


def fold(
    secure: SecureRound,
    replies: list[Message],
    expected: dict[str, torch.Tensor],
    acc: RunningMean | PrivateSum,
) -> None:
    """Take the round's secure mean into ``acc`` as if each of ``replies``' updates had been added to it
    (their clipping is the clients' own: the server never sees an update to clip again)."""
    assert secure.mean is not None
    mean = dict(zip(secure.keys, (torch.from_numpy(np.asarray(a)) for a in secure.mean), strict=False))
    floats = [k for k in secure.keys if expected[k].is_floating_point()]
    shaped = {k: mean[k].reshape(expected[k].shape) for k in secure.keys}
    integers = {
        k: expected[k] + (shaped[k] * COUNTER_SPAN / secure.value_range).round().to(expected[k].dtype)
        for k in secure.keys
        if k not in floats
    }
    if isinstance(acc, PrivateSum):
        n = len(replies)
        unclipped = 0
        if secure.count_unclipped:
            unclipped = round(float(secure.mean[-1][0]) / secure.value_range * n)
        changes = {k: shaped[k] * n for k in floats}
        acc.add_sum(changes, integers, n, unclipped)
        return
    total = sum(int(r.meta["num_samples"]) for r in replies)
    values = {k: (expected[k].double() + shaped[k]).to(expected[k].dtype) for k in floats}
    acc.add({**values, **integers}, total)
