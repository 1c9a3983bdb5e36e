"""The ServerApp: the project's :class:`Server` with a dispatch that goes through Flower's grid.

Node ``partition-id`` i plays client i. A first query to every node hands it the resolved config and learns
its partition; after that each round sends one message per sampled client with ``grid.send_and_receive``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmml.config import Config, config_from_dict, load_config
from fedmml.engines.flower.codec import content_bytes, pack, unpack
from fedmml.experiment import build_server, finish_run, start_run
from fedmml.federation.payload import Message as Payload
from fedmml.tasks import resolve_classes

log = logging.getLogger("flwr")
app = ServerApp()


class RoundFailed(RuntimeError):
    """A round in which a node answered with an error or not at all."""


def resolve_config(run_config: dict[str, Any]) -> Config:
    """The run's config: ``config-file`` (a resolved config.json) if set, else ``preset`` + ``overrides``."""
    if run_config.get("config-file"):
        return config_from_dict(json.loads(Path(str(run_config["config-file"])).read_text()))
    overrides = [o.strip() for o in str(run_config.get("overrides", "")).split(";") if o.strip()]
    return load_config(str(run_config.get("preset", "tiny")), overrides)


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Node ids once at least ``count`` nodes are connected; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RoundFailed(f"only {len(nodes)} of {count} nodes connected within {timeout:.0f} s")
        time.sleep(1.0)


def _check(replies: list[Message], sent: int, what: str) -> None:
    errors = [r.error.reason for r in replies if r.has_error()]
    if errors:
        raise RoundFailed(f"{what}: {len(errors)} node(s) failed; first error: {errors[0]}")
    if len(replies) < sent:
        raise RoundFailed(f"{what}: {sent - len(replies)} of {sent} node(s) did not answer in time")


def map_partitions(grid: Grid, cfg: Config, nodes: list[int], timeout: float) -> dict[int, int]:
    """Send every node the config; return client id (its ``partition-id``) -> node id."""
    config = ConfigRecord({"config": cfg.to_json()})
    queries = [
        Message(RecordDict({"run": config}), dst_node_id=nid, message_type=MessageType.QUERY) for nid in nodes
    ]
    replies = list(grid.send_and_receive(queries, timeout=timeout))
    _check(replies, len(queries), "setup")
    node_of: dict[int, int] = {}
    for reply in replies:
        info = reply.content.config_records["node"]
        if int(info["num-partitions"]) != cfg.federation.num_clients:
            raise RoundFailed(
                f"node {reply.metadata.src_node_id} has num-partitions={info['num-partitions']}, "
                f"the run has {cfg.federation.num_clients} clients"
            )
        node_of[int(info["partition-id"])] = reply.metadata.src_node_id
    missing = sorted(set(range(cfg.federation.num_clients)) - set(node_of))
    if missing:
        raise RoundFailed(f"no node holds partition(s) {missing[:10]}")
    return node_of


class GridDispatch:
    """The Server's dispatch over a Flower grid; also counts the bytes Flower's records carry."""

    def __init__(self, grid: Grid, node_of: dict[int, int], first_timeout: float, timeout: float) -> None:
        self.grid = grid
        self.node_of = node_of
        self.cid_of = {nid: cid for cid, nid in node_of.items()}
        self.timeouts = [first_timeout, timeout]
        self.rounds = 0
        self.last: dict[str, int] = {}

    def __call__(self, outgoing: list[tuple[int, Payload]]) -> list[tuple[int, Payload]]:
        """Send one training message per client and return the replies in the order sent."""
        messages = [
            Message(pack(p, train=True), dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN)
            for cid, p in outgoing
        ]
        # The first round also pays for process start, imports and data loading on every node.
        timeout = self.timeouts[min(self.rounds, 1)]
        self.rounds += 1
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        _check(replies, len(messages), f"round {self.rounds}")
        by_cid = {self.cid_of[r.metadata.src_node_id]: r for r in replies}
        self.last = {
            "flower_bytes_down": sum(content_bytes(m.content) for m in messages),
            "flower_bytes_up": sum(content_bytes(r.content) for r in replies),
        }
        return [(cid, unpack(by_cid[cid].content)) for cid, _ in outgoing]


def _log_event(kind: str, info: dict[str, Any]) -> None:
    if kind == "round_done":
        scores = f" rsum {info['rsum']:.2f}" if "rsum" in info else ""
        log.info("fedmml round %s: loss %.4f%s", info["round"], info["train_loss"], scores)
    elif kind == "stage":
        log.info("fedmml stage %s/%s", info["stage"], info["stages"])


def _default_run_dir(cfg: Config) -> Path:
    return Path.cwd() / "runs" / f"flower-{cfg.preset}-{cfg.run.method}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured experiment over the connected nodes and write the run directory."""
    started = time.perf_counter()
    rc = context.run_config
    # Resolved before anything is sent, so every node builds the same model.
    cfg = resolve_classes(resolve_config(rc))
    out_dir = Path(str(rc["run-dir"])) if rc.get("run-dir") else _default_run_dir(cfg)
    log.info("fedmml: %s on %s clients, writing %s", cfg.run.method, cfg.federation.num_clients, out_dir)
    record = start_run(cfg, out_dir, _log_event)
    nodes = wait_for_nodes(grid, cfg.federation.num_clients, float(rc.get("node-wait-timeout", 120)))
    node_of = map_partitions(grid, cfg, nodes, float(rc.get("first-round-timeout", 900)))
    dispatch = GridDispatch(
        grid, node_of, float(rc.get("first-round-timeout", 900)), float(rc.get("round-timeout", 300))
    )

    def emit(kind: str, info: dict[str, Any]) -> None:
        if kind == "round_done":
            info.update(dispatch.last)
        record(kind, info)

    side = build_server(cfg, emit)
    metrics = side.server.run(dispatch)
    finish_run(cfg, out_dir, side, metrics, started, emit)
