"""The ClientApp: node ``partition-id`` runs the project's :class:`Client` for that partition.

The server's first message (a query) carries the resolved run config; the node keeps it, and the frozen
tensors the client holds, in ``context.state`` so they survive across rounds (and, in deployment, across the
separate processes Flower starts for each message).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import Dataset

from fedmml.config import Config, config_from_dict
from fedmml.engines.flower.codec import pack, unpack
from fedmml.experiment import apply_threads, client_data, select_device
from fedmml.federation.client import Client, Workspace
from fedmml.federation.payload import PayloadError, deserialize, serialize

STATE = "fedmml-state"
app = ClientApp()


@dataclass
class _Loaded:
    """Data and model skeleton of one run, reused by every node a simulation process hosts."""

    key: tuple[int, str]
    cfg: Config
    train: Dataset
    partitions: list[list[int]]
    workspace: Workspace


_cache: list[_Loaded] = []


def node_config_json(config_json: str, node_config: dict[str, Any]) -> str:
    """The run config with this node's local data root (``data-root`` in the node config) applied."""
    if not node_config.get("data-root"):
        return config_json
    tree = json.loads(config_json)
    tree["data"]["root"] = str(node_config["data-root"])
    return json.dumps(tree)


def _loaded(run_id: int, config_json: str) -> _Loaded:
    # Simulation runs many nodes in one process: load the data and build the skeleton once per run. A new
    # run (a repeat, or a resumed run) starts from a fresh skeleton and empty frozen-prefix caches.
    key = (run_id, config_json)
    if _cache and _cache[0].key == key:
        return _cache[0]
    cfg = config_from_dict(json.loads(config_json))
    apply_threads(cfg)
    train, partitions = client_data(cfg)
    loaded = _Loaded(key, cfg, train, partitions, Workspace(cfg, select_device(cfg.run.device)))
    _cache[:] = [loaded]
    return loaded


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.query()
def setup(msg: Message, context: Context) -> Message:
    """Keep the run config the server sent; answer with this node's partition."""
    config_json = node_config_json(str(msg.content.config_records["run"]["config"]), context.node_config)
    context.state[STATE] = ConfigRecord({"config": config_json, "store": b""})
    pid, n = _partition(context)
    return Message(
        RecordDict({"node": ConfigRecord({"partition-id": pid, "num-partitions": n})}), reply_to=msg
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training by this node's client."""
    if STATE not in context.state.config_records:
        # A restarted node has lost its frozen tensors; the server must start over with it.
        raise PayloadError("this node holds no run state (was it restarted?)")
    state = context.state.config_records[STATE]
    loaded = _loaded(context.run_id, str(state["config"]))
    pid, _ = _partition(context)
    client = Client(pid, loaded.cfg, loaded.train, loaded.partitions[pid], loaded.workspace)
    client.store = deserialize(bytes(state["store"]))
    started = time.perf_counter()
    reply = client.handle(unpack(msg.content))
    handled = time.perf_counter() - started
    state["store"] = serialize(client.store)
    return Message(pack(reply, train=False, client_s=handled), reply_to=msg)
