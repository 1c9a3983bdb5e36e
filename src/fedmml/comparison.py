"""Several methods over several seeds: each method's per-seed summaries, their mean and sd, and each
method's ratio to e2e per seed with a 95 % interval — the shape of the paper's claim (a score kept at a
fraction of the client's memory, FLOPs and bytes).

The ratio is taken seed by seed (a method against e2e on the same seed, hence the same partitions and client
samples) and its interval is Student's t over those paired ratios, so the seed-to-seed spread both methods
share does not widen it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

BASELINE = "e2e"
# The client's costs beside the score (each is in every run's summary.json).
COSTS = ("client_peak_mem_bytes", "client_flops_total", "bytes_up_total", "bytes_down_total")
Summary = Mapping[str, Any]


def _numbers(summary: Summary) -> dict[str, float]:
    """The summary's top-level numeric figures (scores, costs, wall time)."""
    return {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def interval(values: list[float]) -> dict[str, Any]:
    """Mean of ``values`` with its two-sided 95 % Student-t interval (none from a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(values)}
    from scipy import stats  # deferred: scipy.stats takes a second to import, and only comparisons need it

    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def combine(per_seed: Mapping[str, Mapping[int, Summary]], keys: tuple[str, ...]) -> dict[str, dict]:
    """For every method: ``seeds`` (its summaries by seed), ``mean`` and ``sd`` of every numeric figure, and
    ``vs_e2e``: for each of ``keys`` and the client costs, the per-seed ratio to e2e and its 95 % interval
    (only over the seeds both ran; absent when e2e is not among the methods)."""
    out: dict[str, dict] = {}
    baseline = per_seed.get(BASELINE, {})
    for method, by_seed in per_seed.items():
        figures = [_numbers(s) for s in by_seed.values()]
        shared = sorted(set.intersection(*(set(f) for f in figures))) if figures else []
        entry: dict[str, Any] = {
            "seeds": {str(seed): dict(s) for seed, s in by_seed.items()},
            "mean": {k: statistics.fmean(f[k] for f in figures) for k in shared},
            "sd": {k: statistics.stdev(f[k] for f in figures) if len(figures) > 1 else 0.0 for k in shared},
        }
        if baseline:
            ratios = {}
            for key in (*keys, *COSTS):
                pairs = [
                    (seed, s[key] / baseline[seed][key])
                    for seed, s in by_seed.items()
                    if seed in baseline and s.get(key) is not None and baseline[seed].get(key)
                ]
                if pairs:
                    ratios[key] = {**interval([r for _, r in pairs]), "per_seed": dict(pairs)}
            entry["vs_e2e"] = ratios
        out[method] = entry
    return out
