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
from fedmml.engines.flower.codec import CLIENT_SECONDS, METRICS, content_bytes, pack, unpack
from fedmml.experiment import CHECKPOINTS, build_server, finish_run, reopen_run, start_run
from fedmml.federation.payload import Message as Payload
from fedmml.federation.server import Listener
from fedmml.tasks import resolve_classes

log = logging.getLogger("flwr")
app = ServerApp()


class SetupFailed(RuntimeError):
    """The run cannot start: nodes missing, or a node failed the setup query."""


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
            raise SetupFailed(f"only {len(nodes)} of {count} nodes connected within {timeout:.0f} s")
        time.sleep(1.0)


def _check(replies: list[Message], sent: int, what: str) -> None:
    errors = [r.error.reason for r in replies if r.has_error()]
    if errors:
        raise SetupFailed(f"{what}: {len(errors)} node(s) failed; first error: {errors[0]}")
    if len(replies) < sent:
        raise SetupFailed(f"{what}: {sent - len(replies)} of {sent} node(s) did not answer in time")


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
            raise SetupFailed(
                f"node {reply.metadata.src_node_id} has num-partitions={info['num-partitions']}, "
                f"the run has {cfg.federation.num_clients} clients"
            )
        node_of[int(info["partition-id"])] = reply.metadata.src_node_id
    missing = sorted(set(range(cfg.federation.num_clients)) - set(node_of))
    if missing:
        raise SetupFailed(f"no node holds partition(s) {missing[:10]}")
    return node_of


class GridDispatch:
    """The Server's dispatch over a Flower grid; also counts the bytes Flower's records carry.

    A node that answers with an error, with an unreadable reply or not before the timeout is dropped from the
    round (the Server then aggregates the others, backfills or retries), as the in-process engine does.
    """

    def __init__(
        self,
        grid: Grid,
        node_of: dict[int, int],
        first_timeout: float,
        timeout: float,
        listener: Listener,
    ) -> None:
        self.grid = grid
        self.node_of = node_of
        self.cid_of = {nid: cid for cid, nid in node_of.items()}
        self.timeouts = [first_timeout, timeout]
        self.listener = listener
        self.calls = 0
        self.measured = self._zero()

    @staticmethod
    def _zero() -> dict[str, Any]:
        return {"flower_bytes_down": 0, "flower_bytes_up": 0, "client_s": 0.0}

    def __call__(self, outgoing: list[tuple[int, Payload]]) -> list[tuple[int, Payload]]:
        """Send one training message per client and return the replies that arrived, in the order sent."""
        messages = [
            Message(pack(p, train=True), dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN)
            for cid, p in outgoing
        ]
        # The first round also pays for process start, imports and data loading on every node.
        timeout = self.timeouts[min(self.calls, 1)]
        self.calls += 1
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.measured["flower_bytes_down"] += sum(content_bytes(m.content) for m in messages)
        self.measured["flower_bytes_up"] += sum(content_bytes(r.content) for r in replies if r.has_content())
        payloads: dict[int, Payload] = {}
        answered: set[int] = set()
        for reply in replies:
            cid = self.cid_of[reply.metadata.src_node_id]
            answered.add(cid)
            if reply.has_error():
                self.listener("client_failed", {"client": cid, "reason": f"node error: {reply.error.reason}"})
                continue
            try:
                payloads[cid] = unpack(reply.content)
            except (KeyError, ValueError) as err:
                self.listener("client_failed", {"client": cid, "reason": f"unreadable reply: {err}"})
                continue
            metrics = reply.content.metric_records.get(METRICS, {})
            self.measured["client_s"] += float(metrics.get(CLIENT_SECONDS, 0.0))
        for cid in sorted({cid for cid, _ in outgoing} - answered):
            self.listener("client_failed", {"client": cid, "reason": f"no reply within {timeout:g} s"})
        return [(cid, payloads[cid]) for cid, _ in outgoing if cid in payloads]

    def take_metrics(self) -> dict[str, Any]:
        """Flower's bytes and the clients' own handling time since the last call (one round)."""
        measured, self.measured = self.measured, self._zero()
        return measured


def _log_event(kind: str, info: dict[str, Any]) -> None:
    if kind == "round_done":
        scores = f" rsum {info['rsum']:.2f}" if "rsum" in info else ""
        log.info("fedmml round %s: loss %.4f%s", info["round"], info["train_loss"], scores)
    elif kind == "stage":
        log.info("fedmml stage %s/%s", info["stage"], info["stages"])
    elif kind in ("client_failed", "rejected"):
        log.warning("fedmml client %s dropped: %s", info["client"], info["reason"])
    elif kind == "skipped":
        log.warning("fedmml round %s skipped: only %s valid updates", info["round"], info["accepted"])


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
    resume = bool(rc.get("resume", False))
    if resume:
        _, (tensors, state), record = reopen_run(out_dir, _log_event)
    else:
        record = start_run(cfg, out_dir, _log_event)
    nodes = wait_for_nodes(grid, cfg.federation.num_clients, float(rc.get("node-wait-timeout", 120)))
    node_of = map_partitions(grid, cfg, nodes, float(rc.get("first-round-timeout", 900)))
    side = build_server(cfg, record, out_dir / CHECKPOINTS)
    if resume:
        side.server.resume(tensors, state)
        # A resumed run is a new Flower run: its nodes start with empty state, so they hold no frozen tensors.
        side.server.ledger.held.clear()
    dispatch = GridDispatch(
        grid,
        node_of,
        float(rc.get("first-round-timeout", 900)),
        float(rc.get("round-timeout", 300)),
        record,
    )
    side.server.engine_metrics = dispatch.take_metrics
    metrics = side.server.run(dispatch)
    finish_run(cfg, out_dir, side, metrics, started, record)
