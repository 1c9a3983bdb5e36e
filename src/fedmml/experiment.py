"""One experiment end to end: choose the engine, run the server's rounds on it, write the outputs.

The parts come from :mod:`fedmml.setup` (model, server, clients) and the run directory is written by
:mod:`fedmml.runs`; this module only chooses and sequences. Engines never import it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmml import report
from fedmml.comparison import combine
from fedmml.config import Config, config_from_dict
from fedmml.device import select_device
from fedmml.engines.inprocess import InProcessEngine
from fedmml.engines.parallel import ParallelEngine, parallel_clients
from fedmml.events import Listener, MethodStarted, Phase, ignore
from fedmml.federation.client import Client, Workspace
from fedmml.methods import centralize
from fedmml.runs import (
    CHECKPOINTS,
    RunExists,
    claim_run_dir,
    finish_run,
    holds_run,
    read_metrics,
    read_run_config,
    reopen_run,
    run_lock,
    start_run,
)
from fedmml.setup import ServerSide, build_server, open_clients
from fedmml.tasks import resolve_classes, task_for
from fedmml.tracking import mlflow_uri


@dataclass
class Setup(ServerSide):
    """Everything an in-process run needs: the server side and the engine; when clients train one after
    another in this process, the clients and their workspace too (with ``federation.parallel_clients`` > 1
    they live in the engine's worker processes)."""

    engine: InProcessEngine | ParallelEngine
    clients: dict[int, Client] = field(default_factory=dict)
    workspace: Workspace | None = None

    def run_rounds(self) -> list[dict[str, Any]]:
        """Run the server's rounds on the engine; its clients' caches (and worker processes) end with them."""
        try:
            return self.server.run(self.engine)
        finally:
            self.engine.close()


def build_setup(cfg: Config, listener: Listener | None = None, checkpoint_dir: Path | None = None) -> Setup:
    """The server side, every client with its own data, and the in-process engine for ``cfg``."""
    cfg = resolve_classes(cfg)
    emit = listener or ignore
    side = build_server(cfg, emit, checkpoint_dir)
    # A disk-backed frozen-prefix cache lives beside the checkpoints, in the run directory.
    cache_dir = checkpoint_dir.parent / "prefix-cache" if checkpoint_dir is not None else None
    device = select_device(cfg.run.device)
    workers = parallel_clients(cfg, device)
    if workers > 1:
        emit(Phase(f"starting {workers} client worker processes"))
        return Setup(side.test, side.server, ParallelEngine(cfg, workers, emit, cache_dir))
    workspace = Workspace(cfg, device, cache_dir)
    emit(Phase("opening the clients' data"))
    clients, failures = open_clients(cfg, workspace)
    engine = InProcessEngine(clients, failures, cfg, workspace, emit)
    return Setup(side.test, side.server, engine, clients, workspace)


def _run_elsewhere(cfg: Config, out_dir: Path, listener: Listener | None, resume: bool) -> dict[str, Any]:
    # Flower is an optional extra: only runs that ask for it import it.
    if cfg.run.engine == "flower-sim":
        from fedmml.engines.flower.launch import run_simulation

        return run_simulation(cfg, out_dir, listener, resume=resume)
    from fedmml.engines.flower.deploy import run_deployment

    return run_deployment(cfg, out_dir, listener, resume=resume)


def _as_run(cfg: Config) -> Config:
    """``cfg`` as a run records it in config.json: classes resolved, the centralized method's federation."""
    return centralize(resolve_classes(cfg))


def run_experiment(
    cfg: Config, out_dir: Path, listener: Listener | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run one method on its configured engine and write every output to ``out_dir``; return the summary.

    A directory that already holds a run is refused unless ``overwrite``.
    """
    cfg = _as_run(cfg)
    with run_lock(out_dir):
        claim_run_dir(out_dir, overwrite)
        if cfg.run.engine != "inprocess":
            return _run_elsewhere(cfg, out_dir, listener, resume=False)
        started = time.perf_counter()
        emit = start_run(cfg, out_dir, listener)
        setup = build_setup(cfg, emit, out_dir / CHECKPOINTS)
        metrics = setup.run_rounds()
        return finish_run(cfg, out_dir, setup, metrics, started, emit)


def resume_experiment(
    run_dir: Path, listener: Listener | None = None, allow_data_change: bool = False
) -> dict[str, Any]:
    """Continue a stopped run from its newest checkpoint (in-process: exactly as if it had never stopped);
    on training data that changed since it started only with ``allow_data_change``."""
    started = time.perf_counter()
    with run_lock(run_dir):
        cfg, (tensors, state), emit = reopen_run(run_dir, listener)
        if cfg.run.engine != "inprocess":
            return _run_elsewhere(cfg, run_dir, listener, resume=True)
        setup = build_setup(cfg, emit, run_dir / CHECKPOINTS)
        setup.server.resume(tensors, state)
        setup.server.allow_data_change = allow_data_change
        metrics = setup.run_rounds()
        return finish_run(cfg, run_dir, setup, metrics, started, emit)


def continue_experiment(cfg: Config, run_dir: Path, listener: Listener | None = None) -> dict[str, Any]:
    """The summary of ``cfg``'s run in ``run_dir``: read when it finished, continued from its newest
    checkpoint when it stopped, started (again) when the directory holds none or no checkpoint yet (see
    :func:`fedmml.runs.holds_run`). A run of another config is refused (a series of runs — a grid, a
    comparison — continues only where it left off)."""
    if not holds_run(run_dir):
        return run_experiment(cfg, run_dir, listener)
    stored = {}
    if (run_dir / "config.json").is_file():
        stored = json.loads(read_run_config(run_dir).to_json())
    wanted = json.loads(_as_run(cfg).to_json())
    if stored != wanted:
        changed = sorted(_differing_keys(stored, wanted))[:3]
        raise RunExists(
            f"{run_dir} holds a run of another config (differs at {', '.join(changed) or 'every key'}); "
            "choose another --out, or pass --overwrite to replace it"
        )
    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    return resume_experiment(run_dir, listener)


def _differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in a.keys() | b.keys():
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _differing_keys(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(prefix + key)
    return keys


def run_or_continue(
    cfg: Config, run_dir: Path, listener: Listener | None, overwrite: bool, resume: bool
) -> dict[str, Any]:
    """:func:`continue_experiment` when ``resume``, else :func:`run_experiment`."""
    if resume:
        return continue_experiment(cfg, run_dir, listener)
    return run_experiment(cfg, run_dir, listener, overwrite)


def compare(
    cfg: Config,
    out_dir: Path,
    methods: tuple[str, ...] = ("e2e", "lw", "prog"),
    listener: Listener | None = None,
    overwrite: bool = False,
    seeds: tuple[int, ...] = (),
    tuned: dict[str, Config] | None = None,
    resume: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run every method on every seed (default: the config's) with the same round budget; within a seed all
    methods share partitions and client samples. Runs go to ``out_dir/<method>`` for one seed, else
    ``out_dir/seed-<s>/<method>``. A method in ``tuned`` runs from its own config (its tuned rates and
    schedule) instead of ``cfg``. With ``resume`` finished runs are read and stopped ones continued (see
    :func:`continue_experiment`). Writes comparison.md/.json and plots; returns the combined figures (see
    :func:`fedmml.comparison.combine`)."""
    seeds = seeds or (cfg.run.seed,)
    per_seed: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for method in methods:
            run_dir = out_dir / method if len(seeds) == 1 else out_dir / f"seed-{seed}" / method
            raw = (tuned or {}).get(method, cfg).to_dict()
            method_cfg = config_from_dict({**raw, "run": {**raw["run"], "method": method, "seed": seed}})
            if "mlflow" in method_cfg.run.log_to and not method_cfg.run.mlflow_uri:
                method_cfg.run.mlflow_uri = mlflow_uri(out_dir)  # one store: the methods side by side
            if listener is not None:
                listener(MethodStarted(method, seed if len(seeds) > 1 else None))
            per_seed[method][seed] = run_or_continue(method_cfg, run_dir, listener, overwrite, resume)
            if method not in runs:  # the plots show the first seed's rounds
                runs[method] = read_metrics(run_dir)
    combined = combine(per_seed, task_for(cfg).summary_keys)
    report.write_comparison(out_dir, combined, runs, cfg.preset)
    return combined
