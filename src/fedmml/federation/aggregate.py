"""Aggregation of client updates."""

from __future__ import annotations

import torch


def fedavg(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of the clients' tensors (FedAvg); integer buffers are rounded back."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = sum(n for _, n in updates)
    if total <= 0:
        raise ValueError("fedavg needs a positive total sample count")
    keys = updates[0][0].keys()
    out = {}
    for key in keys:
        # float64 accumulation keeps the average independent of client order to within float32 rounding.
        acc = sum(t[key].to(torch.float64) * (n / total) for t, n in updates)
        ref = updates[0][0][key]
        out[key] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return out
