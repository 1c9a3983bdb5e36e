"""What a node does for its ClientApp (fedmml.engines.flower.client_app): node ``partition-id`` runs the
project's :class:`Client` on its own data.

The server's first message (a query) carries the resolved run config; the node opens its own training data
(its share of a shared dataset, or under ``partition.kind = "local"`` the folder named by ``data-root`` in its
node config, else ``data.client_roots[partition-id]``) and answers with its size and skip counts, or with the
one line that says why it cannot. It keeps the config, and the frozen tensors its client holds, in
``context.state`` so they survive across rounds (and, in deployment, across the separate processes Flower
starts for each message).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmml.client_data import ClientData, ClientDataError, SharedSplit, open_client_data, source_of
from fedmml.config import Config, config_from_dict
from fedmml.device import apply_threads, select_device
from fedmml.engines.flower import secure
from fedmml.engines.flower.codec import NO_RUN_STATE, pack, unpack
from fedmml.federation.client import Client, Workspace
from fedmml.federation.payload import PayloadError, deserialize, serialize

STATE = "fedmml-state"


@dataclass
class _Loaded:
    """One run's model skeleton and the data of the nodes this process hosts (simulation hosts many)."""

    key: tuple[int, str]
    cfg: Config
    workspace: Workspace
    sources: dict[str, SharedSplit | None] = field(default_factory=dict)
    data: dict[tuple[int, str], ClientData] = field(default_factory=dict)

    def client_data(self, pid: int, root: str) -> ClientData:
        """This node's own data, opened once per process: its folder, or its share of the shared split (at
        ``root`` when the node keeps its copy elsewhere than the server's config says)."""
        if (pid, root) not in self.data:
            if root not in self.sources:
                # A shared split's metadata only; the node decodes just its own share below.
                shared = source_of(self.cfg, root or None)
                if shared is not None and self.cfg.run.engine == "flower-sim":
                    # Except in a simulation, whose clients all share this machine and its image store:
                    # stored at once (see SharedSplit.store_images), not a shard each.
                    shared.store_images(range(self.cfg.federation.num_clients))
                self.sources[root] = shared
            self.data[(pid, root)] = open_client_data(self.cfg, pid, self.sources[root], root or None)
        return self.data[(pid, root)]


_cache: list[_Loaded] = []


def _loaded(run_id: int, config_json: str) -> _Loaded:
    # A new run (a repeat, or a resumed run) starts from a fresh skeleton and empty frozen-prefix caches.
    key = (run_id, config_json)
    if _cache and _cache[0].key == key:
        return _cache[0]
    cfg = config_from_dict(json.loads(config_json))
    apply_threads(cfg)
    loaded = _Loaded(key, cfg, Workspace(cfg, select_device(cfg.run.device)))
    _cache[:] = [loaded]
    return loaded


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def _data_root(context: Context) -> str:
    """The node's own data folder from its node config, if it names one."""
    return str(context.node_config.get("data-root", "") or "")


def setup(msg: Message, context: Context) -> Message:
    """Keep the run config the server sent, open this node's own data, and answer with its partition and its
    data description, or the one line that says why the data cannot be used."""
    config_json = str(msg.content.config_records["run"]["config"])
    context.state[STATE] = ConfigRecord({"config": config_json, "store": b""})
    pid, n = _partition(context)
    node: dict[str, Any] = {"partition-id": pid, "num-partitions": n}
    try:
        loaded = _loaded(context.run_id, config_json)
        data = loaded.client_data(pid, _data_root(context))
        described = Client(pid, loaded.cfg, data, loaded.workspace).describe()
        if context.node_config.get("memory-mib") is not None:
            # The device's own memory budget (federation.client_memory_mib), which the server plans with.
            described["memory_mib"] = float(context.node_config["memory-mib"])
        node["data"] = json.dumps(described)
    except ClientDataError as err:
        node["error"] = str(err)
    return Message(RecordDict({"node": ConfigRecord(node)}), reply_to=msg)


def handle(msg: Message, context: Context) -> Message:
    """This node's client answers one message (training or evaluation) with the state the node keeps; a
    SecAgg+ round's instruction with the change its mod masks."""
    if STATE not in context.state.config_records:
        # A restarted node has lost its frozen tensors; the server must start over with it.
        raise PayloadError(f"{NO_RUN_STATE} (was it restarted?)")
    state = context.state.config_records[STATE]
    loaded = _loaded(context.run_id, str(state["config"]))
    pid, _ = _partition(context)
    client = Client(pid, loaded.cfg, loaded.client_data(pid, _data_root(context)), loaded.workspace)
    client.store = deserialize(bytes(state["store"]))
    summed = secure.instruction(msg.content)
    started = time.perf_counter()
    reply = client.handle(summed or unpack(msg.content))
    handled = time.perf_counter() - started
    state["store"] = serialize(client.store)
    if summed is not None:
        return Message(secure.reply_content(summed, reply, handled), reply_to=msg)
    return Message(pack(reply, train=False, client_s=handled), reply_to=msg)
