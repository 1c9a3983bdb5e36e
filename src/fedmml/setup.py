"""From a config to the parts of a run: the device, the global model and its stage plan, the server, and the
in-process clients. Engines build on these; nothing here knows an engine.

The server side opens no training data: it gets a test split to evaluate on (``data.root`` needs only that)
and learns its clients' sizes from what they report at set-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedmml.bench import slice_peaks
from fedmml.client_data import ClientDataError, open_client_data, source_of
from fedmml.config import Config
from fedmml.data.missing import incomplete
from fedmml.device import apply_threads, select_device
from fedmml.events import Listener, Phase, ignore
from fedmml.federation.client import Client, Workspace, derive_seed
from fedmml.federation.server import Server
from fedmml.methods import plan_stages
from fedmml.models.build import build_model
from fedmml.models.multimodal import MultimodalModel
from fedmml.precision import autocast
from fedmml.tasks import task_for


def global_model(cfg: Config, device: torch.device) -> MultimodalModel:
    """The server's model with pretrained weights; heads seeded by the run seed."""
    torch.manual_seed(derive_seed(cfg.run.seed, 0))
    lora = cfg.run.method == "lora"
    return build_model(cfg.model, load_weights=True, adapters=lora, missing=incomplete(cfg)).to(device)


def final_depth(cfg: Config) -> dict[str, int]:
    """Blocks per encoder once the schedule is complete."""
    return {m: sum(b) for m, b in cfg.active_schedule.blocks.items()}


def evaluate_on(model: MultimodalModel, data: Dataset, cfg: Config) -> dict[str, Any]:
    """The task's scores of ``model`` over a whole evaluation split."""
    with autocast(cfg.run.precision, model.device):
        return task_for(cfg).evaluate(model, data, cfg)


@dataclass
class ServerSide:
    """The server process's part of a run: its test split (None under federated evaluation) and the
    engine-agnostic :class:`Server`."""

    test: Dataset | None
    server: Server


def build_server(
    cfg: Config, listener: Listener | None = None, checkpoint_dir: Path | None = None
) -> ServerSide:
    """The global model, its stage plan, the test split and the server for ``cfg``; no training data."""
    emit = listener or ignore
    apply_threads(cfg)
    device = select_device(cfg.run.device)
    # The model comes first so that a schedule that cannot fit the encoders fails before data is loaded.
    emit(Phase("building model"))
    model = global_model(cfg, device)
    totals = {m: enc.total_blocks for m, enc in model.encoders.items()}
    stages = plan_stages(cfg.active_schedule, cfg.run.method, totals)

    def measure() -> dict[int, dict[str, int]]:
        # Under memory budgets: each slice's client peak, measured here with the client's own code.
        return slice_peaks(cfg)

    if cfg.eval.where == "federated":
        # The clients score the model on their own held-out data; the server holds no data at all.
        return ServerSide(None, Server(cfg, model, stages, None, emit, checkpoint_dir, measure))
    emit(Phase(f"loading the {cfg.eval.split} split"))
    test = task_for(cfg).load_held_out(cfg)

    def evaluate(m: MultimodalModel) -> dict[str, Any]:
        emit(Phase("evaluating"))
        return evaluate_on(m, test, cfg)

    return ServerSide(test, Server(cfg, model, stages, evaluate, emit, checkpoint_dir, measure))


def open_clients(cfg: Config, workspace: Workspace) -> tuple[dict[int, Client], dict[int, str]]:
    """Every client of an in-process run with its own data; those that cannot open theirs, with the line
    that says why."""
    shared = source_of(cfg)
    if shared is not None:
        shared.store_images(range(cfg.federation.num_clients))
    clients: dict[int, Client] = {}
    failures: dict[int, str] = {}
    for cid in range(cfg.federation.num_clients):
        try:
            data = open_client_data(cfg, cid, shared)
        except ClientDataError as err:
            failures[cid] = str(err)
            continue
        clients[cid] = Client(cid, cfg, data, workspace)
    return clients, failures
