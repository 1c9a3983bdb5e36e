"""Aggregation of client updates: sample-weighted FedAvg and two robust alternatives."""

from __future__ import annotations

from collections.abc import Callable

import torch

Update = tuple[dict[str, torch.Tensor], int]


def _cast_like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return value.to(ref.dtype) if ref.is_floating_point() else value.round().to(ref.dtype)


def fedavg(updates: list[Update]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of the clients' tensors (FedAvg); integer buffers are rounded back."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = sum(n for _, n in updates)
    if total <= 0:
        raise ValueError("fedavg needs a positive total sample count")
    out = {}
    for key, ref in updates[0][0].items():
        # float64 accumulation keeps the average independent of client order to within float32 rounding.
        acc = sum(t[key].to(torch.float64) * (n / total) for t, n in updates)
        out[key] = _cast_like(acc, ref)
    return out


def _stacked(updates: list[Update], key: str) -> torch.Tensor:
    return torch.stack([t[key].to(torch.float64) for t, _ in updates])


def coordinate_median(updates: list[Update]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (unweighted): robust to a minority of arbitrary updates."""
    if not updates:
        raise ValueError("median aggregation needs at least one update")
    n = len(updates)
    out = {}
    for key, ref in updates[0][0].items():
        # Sorting and averaging the middle pair: torch.median takes the lower one, and torch.quantile
        # refuses tensors over 16M elements (a 4096x4096 head from a few clients).
        values = _stacked(updates, key).sort(dim=0).values
        out[key] = _cast_like((values[(n - 1) // 2] + values[n // 2]) / 2, ref)
    return out


def trimmed_mean(updates: list[Update], trim: float = 0.2) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the ``trim`` fraction of largest and of smallest values."""
    if not updates:
        raise ValueError("trimmed-mean aggregation needs at least one update")
    if not 0 <= trim < 0.5:
        raise ValueError("trim must be in [0, 0.5)")
    cut = int(trim * len(updates))
    out = {}
    for key, ref in updates[0][0].items():
        values = _stacked(updates, key).sort(dim=0).values
        out[key] = _cast_like(values[cut : len(updates) - cut].mean(dim=0), ref)
    return out


AGGREGATORS: dict[str, Callable[[list[Update]], dict[str, torch.Tensor]]] = {
    "fedavg": fedavg,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
}
