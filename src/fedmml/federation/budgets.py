"""Client memory budgets and the slice of the model each client trains within its budget.

A slice is what a client trains and uploads in a stage, named by the method whose trainable set it is:

- ``prog``: every block present (Prog-FedMML's slice), with the norms, necks and heads;
- ``lw``: the stage's new blocks with norms, necks and heads, the earlier blocks frozen and cached
  (LW-FedMML's slice);
- ``heads``: the necks and heads on frozen encoders (the ``frozen`` method's slice);
- ``out``: nothing fits, and the client sits the stage out.

Under ``run.method = "hetero"`` each client gets the deepest slice whose peak training memory fits its budget
(of those ``federation.hetero_slices`` allows);
under any other method a client trains that method's slice or sits out (what a federation must do with its
weak devices when it cannot mix methods). A slice's peak is measured, not estimated: the real client trains
a few steps of it on synthetic batches of the run's shapes, once per stage (:func:`fedmml.bench.slice_peaks`).
"""

from __future__ import annotations

from typing import Any

from fedmml.config import HETERO_SLICES, Config
from fedmml.federation import SetupFailed

OUT = "out"
# The method a client runs for a slice (the client needs nothing else to train it).
_SLICE_METHOD = {"heads": "frozen"}
MIB = 2**20


class BudgetError(SetupFailed):
    """Too few clients' budgets fit a slice of some stage for its rounds to run."""


def slices_of(cfg: Config) -> tuple[str, ...]:
    """The slices a client of ``cfg.run.method`` may be given, deepest first (hetero: those of
    ``federation.hetero_slices``)."""
    if cfg.run.method != "hetero":
        return (cfg.run.method,)
    return tuple(s for s in HETERO_SLICES if s in cfg.federation.hetero_slices)


def slice_method(name: str) -> str:
    """The method a client runs to train slice ``name``."""
    return _SLICE_METHOD.get(name, name)


def client_budgets(cfg: Config, reports: dict[int, dict[str, Any]]) -> dict[int, float]:
    """Each set-up client's budget in MiB (0: none): what it reported (a SuperNode's ``memory-mib``), else
    ``federation.client_memory_mib``."""
    configured = cfg.federation.client_memory_mib
    budgets = {}
    for cid, report in reports.items():
        if "memory_mib" in report:
            budgets[cid] = float(report["memory_mib"])
        elif isinstance(configured, list):
            budgets[cid] = float(configured[cid]) if cid < len(configured) else 0.0
        else:
            budgets[cid] = float(configured)
    return budgets


def limited(budgets: dict[int, float]) -> bool:
    """Whether any client has a budget."""
    return any(b > 0 for b in budgets.values())


def plan_stage(budgets: dict[int, float], peaks: dict[str, int], slices: tuple[str, ...]) -> dict[int, str]:
    """Per client, the first of ``slices`` whose measured peak (bytes) fits its budget, or :data:`OUT`."""
    plan = {}
    for cid, mib in budgets.items():
        fits = [s for s in slices if mib <= 0 or peaks[s] <= mib * MIB]
        plan[cid] = fits[0] if fits else OUT
    return plan


def check_plans(plans: dict[int, dict[int, str]], peaks: dict[int, dict[str, int]], min_clients: int) -> None:
    """Before training: fail if a stage's plan leaves fewer than ``min_clients`` clients training, saying
    what the smallest slice needs."""
    for stage, plan in sorted(plans.items()):
        training = sum(s != OUT for s in plan.values())
        if training >= min_clients:
            continue
        name, need = min(peaks[stage].items(), key=lambda item: item[1])
        raise BudgetError(
            f"stage {stage + 1}: {training} of {len(plan)} clients fit a slice within their memory budget "
            f"(federation.min_clients = {min_clients}); the smallest, {name}, needs {need / MIB:.1f} MiB"
        )


def summarize(metrics: list[dict[str, Any]], limits: dict[int, float]) -> dict[str, Any]:
    """What a run's plans came to: the budgets, client-rounds per slice, client-stages sat out, and how many
    client-rounds' measured peaks stayed within budget."""
    rounds = [r for r in metrics if "client_plans" in r]
    per_slice: dict[str, int] = {}
    measured = within = 0
    for record in rounds:
        plan = record["client_plans"]
        for cid in record["clients"]:
            per_slice[plan[str(cid)]] = per_slice.get(plan[str(cid)], 0) + 1
        for cid, peak in record.get("client_peak_mem", {}).items():
            measured += 1
            limit = limits.get(int(cid), 0.0)
            within += limit <= 0 or peak <= limit * MIB
    stages = {r["stage"]: r["client_plans"] for r in rounds}
    return {
        "client_memory_mib": {str(c): b for c, b in sorted(limits.items())},
        "client_rounds": per_slice,
        "client_stages_out": sum(s == OUT for plan in stages.values() for s in plan.values()),
        "client_rounds_measured": measured,
        "client_rounds_within_budget": within,
    }
