"""Aggregation of client updates: sample-weighted FedAvg and two robust alternatives."""

from __future__ import annotations

from collections.abc import Callable

import torch

Update = tuple[dict[str, torch.Tensor], int]


def _cast_like(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype) if dtype.is_floating_point else value.round().to(dtype)


class RunningMean:
    """FedAvg folded in one update at a time: a float64 sum of sample-weighted tensors, so a round holds one
    running sum (twice a model's float32 size) instead of every client's update until the last arrives.

    Each tensor is averaged over the clients whose update holds it (under memory budgets a client uploads
    only its own slice), weighted by their sample counts."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.totals: dict[str, int] = {}

    def add(self, tensors: dict[str, torch.Tensor], num_samples: int) -> None:
        """Fold in one client's tensors, weighted by its sample count."""
        for key, value in tensors.items():
            # float64 keeps the average independent of client order to within float32 rounding.
            weighted = value.to(torch.float64) * num_samples
            if key in self.sums:
                self.sums[key] += weighted
                self.totals[key] += num_samples
            else:
                self.sums[key], self.dtypes[key], self.totals[key] = weighted, value.dtype, num_samples

    def result(self) -> dict[str, torch.Tensor]:
        """The sample-weighted average in each tensor's own dtype; integer buffers are rounded back."""
        if not self.sums:
            raise ValueError("fedavg needs at least one update")
        if min(self.totals.values()) <= 0:
            raise ValueError("fedavg needs a positive total sample count")
        return {k: _cast_like(s / self.totals[k], self.dtypes[k]) for k, s in self.sums.items()}


def fedavg(updates: list[Update]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of the clients' tensors (FedAvg); integer buffers are rounded back."""
    mean = RunningMean()
    for tensors, num_samples in updates:
        mean.add(tensors, num_samples)
    return mean.result()


def _stacked(updates: list[Update], key: str) -> torch.Tensor:
    """``key``'s values, one row per update that holds it."""
    return torch.stack([t[key].to(torch.float64) for t, _ in updates if key in t])


def _references(updates: list[Update]) -> dict[str, torch.Tensor]:
    """One value of every key any update holds (updates of different slices hold different keys)."""
    refs: dict[str, torch.Tensor] = {}
    for tensors, _ in updates:
        refs.update({k: v for k, v in tensors.items() if k not in refs})
    return refs


def coordinate_median(updates: list[Update]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (unweighted): robust to a minority of arbitrary updates."""
    if not updates:
        raise ValueError("median aggregation needs at least one update")
    out = {}
    for key, ref in _references(updates).items():
        # Sorting and averaging the middle pair: torch.median takes the lower one, and torch.quantile
        # refuses tensors over 16M elements (a 4096x4096 head from a few clients).
        values = _stacked(updates, key).sort(dim=0).values
        n = len(values)
        out[key] = _cast_like((values[(n - 1) // 2] + values[n // 2]) / 2, ref.dtype)
    return out


def trimmed_mean(updates: list[Update], trim: float = 0.2) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the ``trim`` fraction of largest and of smallest values."""
    if not updates:
        raise ValueError("trimmed-mean aggregation needs at least one update")
    if not 0 <= trim < 0.5:
        raise ValueError("trim must be in [0, 0.5)")
    out = {}
    for key, ref in _references(updates).items():
        values = _stacked(updates, key).sort(dim=0).values
        cut = int(trim * len(values))
        out[key] = _cast_like(values[cut : len(values) - cut].mean(dim=0), ref.dtype)
    return out


AGGREGATORS: dict[str, Callable[[list[Update]], dict[str, torch.Tensor]]] = {
    "fedavg": fedavg,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
}
