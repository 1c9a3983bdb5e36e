"""One experiment end to end: build data, clients and model from a config, run an engine, write the outputs.

A run directory holds ``config.json``, ``metrics.jsonl``, ``summary.json``, ``model.safetensors``,
``report.md`` and PNG plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from fedmml import report
from fedmml.accounting import memory_method
from fedmml.config import Config, config_from_dict
from fedmml.engines.inprocess import InProcessEngine
from fedmml.federation.checkpoint import latest_checkpoint, load_checkpoint
from fedmml.federation.client import Client, Workspace, derive_seed
from fedmml.federation.server import Listener, Server
from fedmml.methods import plan_stages
from fedmml.models.build import build_model
from fedmml.models.multimodal import MultimodalModel
from fedmml.tasks import resolve_classes, task_for

CHECKPOINTS = "checkpoints"
Checkpoint = tuple[dict[str, torch.Tensor], dict[str, Any]]


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def global_model(cfg: Config, device: torch.device) -> MultimodalModel:
    """The server's model with pretrained weights; heads seeded by the run seed."""
    torch.manual_seed(derive_seed(cfg.run.seed, 0))
    return build_model(cfg.model, load_weights=True).to(device)


def final_depth(cfg: Config) -> dict[str, int]:
    """Blocks per encoder once the schedule is complete."""
    return {m: sum(b) for m, b in cfg.active_schedule.blocks.items()}


def save_model(model: MultimodalModel, path: Path) -> None:
    """Weights as safetensors (the architecture is rebuilt from the run's config.json)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_run_model(run_dir: Path, device: torch.device | None = None) -> tuple[Config, MultimodalModel]:
    """The config and final global model of a finished run."""
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    model = build_model(cfg.model, load_weights=False)
    for modality, depth in final_depth(cfg).items():
        model.encoders[modality].grow_to(depth)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")), strict=True)
    return cfg, model.to(device or torch.device("cpu"))


def evaluate_on(model: MultimodalModel, data: Dataset, cfg: Config) -> dict[str, Any]:
    """The task's scores of ``model`` over a whole evaluation split."""
    return task_for(cfg).evaluate(model, data, cfg)


class _MetricsWriter:
    """Appends each finished round to metrics.jsonl as it happens, then forwards the event."""

    def __init__(self, path: Path, forward: Listener | None) -> None:
        self.path = path
        self.forward = forward

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "round_done":
            with self.path.open("a") as f:
                f.write(json.dumps(info) + "\n")
        if self.forward is not None:
            self.forward(kind, info)


@dataclass
class ServerSetup:
    """The server side of one run: its data and the engine-agnostic :class:`Server`."""

    train: Dataset
    test: Dataset
    partitions: list[list[int]]
    server: Server


@dataclass
class Setup(ServerSetup):
    """Everything an in-process run needs: the server side plus every client and the engine."""

    clients: list[Client]
    engine: InProcessEngine
    workspace: Workspace

    def run_rounds(self) -> list[dict[str, Any]]:
        """Run the server's rounds on the in-process engine; frozen-prefix caches are dropped at the end."""
        try:
            return self.server.run(self.engine.dispatch)
        finally:
            self.workspace.caches.close()


def apply_threads(cfg: Config) -> None:
    """Torch intra-op threads as configured (0 keeps PyTorch's default)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


def client_data(cfg: Config) -> tuple[Dataset, list[list[int]]]:
    """The training split and every client's share of it (the same on the server and on every client)."""
    task = task_for(cfg)
    train = task.load_split(cfg, cfg.data.train_split, train=True)
    return train, task.partitions(cfg, train)


def build_server(
    cfg: Config, listener: Listener | None = None, checkpoint_dir: Path | None = None
) -> ServerSetup:
    """Data, client partitions, the global model and the server for ``cfg``; no clients."""
    emit = listener or (lambda kind, info: None)
    apply_threads(cfg)
    device = select_device(cfg.run.device)
    # The model comes first so that a schedule that cannot fit the encoders fails before data is loaded.
    emit("phase", {"phase": "building model"})
    model = global_model(cfg, device)
    totals = {m: enc.total_blocks for m, enc in model.encoders.items()}
    stages = plan_stages(cfg.active_schedule, cfg.run.method, totals)
    emit("phase", {"phase": "loading data"})
    train, parts = client_data(cfg)
    test = task_for(cfg).load_split(cfg, cfg.data.test_split, train=False)

    def evaluate(m: MultimodalModel) -> dict[str, Any]:
        emit("phase", {"phase": "evaluating"})
        return evaluate_on(m, test, cfg)

    server = Server(cfg, model, stages, [len(p) for p in parts], evaluate, emit, checkpoint_dir)
    return ServerSetup(train, test, parts, server)


def build_setup(cfg: Config, listener: Listener | None = None, checkpoint_dir: Path | None = None) -> Setup:
    """Data, client partitions, the global model, the server and the in-process engine for ``cfg``."""
    cfg = resolve_classes(cfg)
    emit = listener or (lambda kind, info: None)
    side = build_server(cfg, emit, checkpoint_dir)
    # A disk-backed frozen-prefix cache lives beside the checkpoints, in the run directory.
    cache_dir = checkpoint_dir.parent / "prefix-cache" if checkpoint_dir is not None else None
    workspace = Workspace(cfg, select_device(cfg.run.device), cache_dir)
    clients = [Client(cid, cfg, side.train, idx, workspace) for cid, idx in enumerate(side.partitions)]
    engine = InProcessEngine(clients, cfg, workspace, emit)
    side.server.engine_state = engine.state_dict
    side.server.engine_metrics = engine.take_metrics
    return Setup(side.train, side.test, side.partitions, side.server, clients, engine, workspace)


def start_run(cfg: Config, out_dir: Path, listener: Listener | None = None) -> Listener:
    """Create the run directory with config.json and an empty metrics.jsonl; return the recording listener."""
    probe = out_dir / ".write-test"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write to the run directory {out_dir}: {err.strerror}") from None
    (out_dir / "config.json").write_text(cfg.to_json())
    (out_dir / "metrics.jsonl").write_text("")
    return _MetricsWriter(out_dir / "metrics.jsonl", listener)


def finish_run(
    cfg: Config,
    out_dir: Path,
    side: ServerSetup,
    metrics: list[dict[str, Any]],
    started: float,
    emit: Listener,
) -> dict[str, Any]:
    """Write the model, summary.json and the report of a finished run; return the summary."""
    train, test, model, stages = side.train, side.test, side.server.model, side.server.stages
    emit("phase", {"phase": "writing outputs"})
    save_model(model, out_dir / "model.safetensors")
    task = task_for(cfg)
    final = next(m for m in reversed(metrics) if task.score_key in m)
    summary: dict[str, Any] = {
        "task": task.name,
        "method": cfg.run.method,
        "preset": cfg.preset,
        "schedule": cfg.schedule,
        "rounds": len(metrics),
        "stages": len(stages),
        "clients": cfg.federation.num_clients,
        **{k: final[k] for k in task.summary_keys},
        "bytes_up_total": sum(m["bytes_up"] for m in metrics),
        "bytes_down_total": sum(m["bytes_down"] for m in metrics),
        # Measured per client (fedmml.accounting): FLOPs summed over the run, peak memory as the maximum.
        "client_flops_total": sum(m.get("client_flops", 0) for m in metrics),
        "client_peak_mem_bytes": max((m.get("client_peak_mem_bytes", 0) for m in metrics), default=0),
        "memory_method": memory_method(select_device(cfg.run.device)),
        "train_images": len(train),
        "test_images": len(test),
        "skipped": {"train": train.skipped, "test": test.skipped},
    }
    summary.update(task.summarize(model, test, cfg, out_dir, final))
    summary["wall_s"] = time.perf_counter() - started
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    report.write_run_report(out_dir, cfg.to_dict(), summary, metrics)
    return summary


def run_experiment(cfg: Config, out_dir: Path, listener: Listener | None = None) -> dict[str, Any]:
    """Run one method on its configured engine and write every output to ``out_dir``; return the summary."""
    cfg = resolve_classes(cfg)
    if cfg.run.engine != "inprocess":
        # Flower is an optional extra: only runs that ask for it import it.
        from fedmml.engines.flower.launch import run_on_flower

        return run_on_flower(cfg, out_dir, listener)
    started = time.perf_counter()
    emit = start_run(cfg, out_dir, listener)
    setup = build_setup(cfg, emit, out_dir / CHECKPOINTS)
    metrics = setup.run_rounds()
    return finish_run(cfg, out_dir, setup, metrics, started, emit)


def reopen_run(run_dir: Path, listener: Listener | None = None) -> tuple[Config, Checkpoint, Listener]:
    """A stopped run's config and newest checkpoint, and a listener that appends to its metrics.jsonl.

    Rounds after the checkpoint are redone, so their lines are dropped from metrics.jsonl.
    """
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    found = latest_checkpoint(run_dir / CHECKPOINTS)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / CHECKPOINTS}; start the run again instead")
    tensors, state = load_checkpoint(found)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in state["metrics"]))
    return cfg, (tensors, state), _MetricsWriter(run_dir / "metrics.jsonl", listener)


def resume_experiment(run_dir: Path, listener: Listener | None = None) -> dict[str, Any]:
    """Continue a stopped run from its newest checkpoint (in-process: exactly as if it had never stopped)."""
    started = time.perf_counter()
    cfg, (tensors, state), emit = reopen_run(run_dir, listener)
    if cfg.run.engine != "inprocess":
        from fedmml.engines.flower.launch import run_on_flower

        return run_on_flower(cfg, run_dir, listener, resume=True)
    setup = build_setup(cfg, emit, run_dir / CHECKPOINTS)
    setup.server.resume(tensors, state)
    setup.engine.load_state_dict(state["engine"])
    for client in setup.clients:
        client.store = setup.server.held_tensors(client.cid)
    metrics = setup.run_rounds()
    return finish_run(cfg, run_dir, setup, metrics, started, emit)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-round records of a run."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def compare(
    cfg: Config,
    out_dir: Path,
    methods: tuple[str, ...] = ("e2e", "lw", "prog"),
    listener: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run several methods with the same seed and round budget; write comparison.md/.json and plots."""
    summaries, runs = {}, {}
    for method in methods:
        method_cfg = config_from_dict({**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "method": method}})
        if listener is not None:
            listener("method", {"method": method})
        summaries[method] = run_experiment(method_cfg, out_dir / method, listener)
        runs[method] = read_metrics(out_dir / method)
    report.write_comparison(out_dir, summaries, runs, cfg.preset)
    return summaries
