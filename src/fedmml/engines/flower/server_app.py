"""The ServerApp: the project's :class:`Server` driven through Flower's grid by :class:`GridEngine`.

Node ``partition-id`` i plays client i. A first query to every node hands it the resolved config; each node
opens its own data and answers with its partition and data description (or the one line that says why it
cannot). After that each round sends one message per sampled client with ``grid.send_and_receive``. Replies
are matched to the messages they answer, never to their source node: Flower answers for a lost node itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedmml.config import Config, config_from_dict, load_config
from fedmml.engines.flower import secure
from fedmml.engines.flower.codec import CLIENT_SECONDS, METRICS, NO_RUN_STATE, content_bytes, pack, unpack
from fedmml.events import ClientDropped, Event, Listener, Notice, RoundDone, RoundSkipped, StageStarted
from fedmml.federation import SetupFailed
from fedmml.federation.payload import Message as Payload
from fedmml.federation.secure import SECURE_BYTES_UP, SecureRound
from fedmml.federation.server import Server
from fedmml.runs import CHECKPOINTS, finish_run, reopen_run, start_run
from fedmml.setup import build_server
from fedmml.tasks import resolve_classes

log = logging.getLogger("flwr")
app = ServerApp()
WAIT_NOTE_S = 20.0  # seconds between the lines that say the server still waits for replies


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


def exchange(
    grid: Grid, messages: list[Message], timeout: float, waiting_on: str
) -> dict[int, Message | None]:
    """Send ``messages`` and return, by position in ``messages``, the reply that answers each (None when
    none came in time). Flower answers for a node it lost with an error reply whose source is the SuperLink,
    so replies are matched by the message they answer. While the replies are out, a line every
    :data:`WAIT_NOTE_S` seconds says what the server waits for (``waiting_on``: who is asked, and why)."""
    stop = threading.Event()

    def remind() -> None:
        waited = 0.0
        while not stop.wait(WAIT_NOTE_S):
            waited += WAIT_NOTE_S
            log.warning(
                "fedmml: waiting %g s so far for %s (at most %g s); a node that stopped (killed, its "
                "machine gone) is answered for by Flower once its heartbeats have lapsed, about a minute",
                waited,
                waiting_on,
                timeout,
            )

    reminder = threading.Thread(target=remind, name="fedmml-wait-note", daemon=True)
    reminder.start()
    try:
        replies = list(grid.send_and_receive(messages, timeout=timeout))
    finally:
        stop.set()
        reminder.join()
    # The grid gives every message its id as it sends it.
    position = {m.metadata.message_id: i for i, m in enumerate(messages)}
    answered: dict[int, Message | None] = dict.fromkeys(range(len(messages)))
    for reply in replies:
        i = position.get(reply.metadata.reply_to_message_id)
        if i is not None:
            answered[i] = reply
    return answered


class _CountingGrid:
    """A grid that adds the bytes of what it sends and receives to ``measured`` (a round's figures), and
    keeps what each node sent (``up``, by node id)."""

    def __init__(self, grid: Grid, measured: dict[str, Any]) -> None:
        self.grid = grid
        self.measured = measured
        self.up: dict[int, int] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.measured["flower_bytes_down"] += sum(content_bytes(m.content) for m in messages)
        for reply in replies:
            if reply.has_content():
                size = content_bytes(reply.content)
                self.measured["flower_bytes_up"] += size
                self.up[reply.metadata.src_node_id] = self.up.get(reply.metadata.src_node_id, 0) + size
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class GridEngine:
    """The :class:`~fedmml.federation.server.Engine` over a Flower grid; also counts Flower's bytes.

    A node that answers with an error (its own, or Flower's for a node it lost), with an unreadable reply or
    not before the timeout is dropped from the round (the Server then aggregates the others, backfills or
    retries), as the in-process engine does.
    """

    def __init__(self, grid: Grid, cfg: Config, run_config: dict[str, Any], listener: Listener) -> None:
        self.grid = grid
        self.cfg = cfg
        self.node_wait = float(run_config.get("node-wait-timeout", 120))
        # The first round also pays for process start, imports and data loading on every node.
        self.timeouts = [
            float(run_config.get("first-round-timeout", 900)),
            float(run_config.get("round-timeout", 300)),
        ]
        self.listener = listener
        self.node_of: dict[int, int] = {}
        self.restarted: set[int] = set()  # clients whose node was lost or answered that it holds no run state
        self.calls = 0
        self.measured = self._zero()

    @staticmethod
    def _zero() -> dict[str, Any]:
        return {"flower_bytes_down": 0, "flower_bytes_up": 0, "client_s": 0.0}

    def setup(self) -> dict[int, dict[str, Any]]:
        """Send every node the config; each opens its own data and reports it (or why it cannot)."""
        n = self.cfg.federation.num_clients
        reports, unplaced = self._set_up(wait_for_nodes(self.grid, n, self.node_wait))
        for cid in range(n):
            failed = f" ({'; '.join(unplaced)})" if unplaced else ""
            reports.setdefault(cid, {"error": f"no node set up partition {cid}{failed}"})
        return reports

    def _set_up(self, nodes: list[int]) -> tuple[dict[int, dict[str, Any]], list[str]]:
        """The set-up query to ``nodes``: reports by client id (mapping each to its node), and the nodes
        that failed before saying which partition they hold."""
        n = self.cfg.federation.num_clients
        config = ConfigRecord({"config": self.cfg.to_json()})
        queries = [
            Message(RecordDict({"run": config}), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in nodes
        ]
        reports: dict[int, dict[str, Any]] = {}
        unplaced: list[str] = []
        waiting_on = f"the set-up replies of nodes {nodes}"
        for i, reply in exchange(self.grid, queries, self.timeouts[0], waiting_on).items():
            if reply is None or reply.has_error():
                why = "no answer" if reply is None else reply.error.reason.strip().splitlines()[-1]
                unplaced.append(f"node {nodes[i]}: {why}")
                continue
            info = reply.content.config_records["node"]
            if int(info["num-partitions"]) != n:
                raise SetupFailed(
                    f"node {nodes[i]} has num-partitions={info['num-partitions']}, the run has {n} clients"
                )
            cid = int(info["partition-id"])
            self.node_of[cid] = nodes[i]
            if "error" in info:
                reports[cid] = {"error": f"node {nodes[i]}: {info['error']}"}
            else:
                reports[cid] = json.loads(str(info["data"]))
        return reports, unplaced

    def lost_state(self) -> list[int]:
        """Clients whose node came back empty (a SuperNode restarted, under its old id or a new one): set up
        again here, so the next message to them may carry every frozen tensor anew."""
        known = set(self.node_of.values())
        fresh = [nid for nid in self.grid.get_node_ids() if nid not in known]
        nodes = sorted({self.node_of[cid] for cid in self.restarted} | set(fresh))
        if not nodes:
            return []
        reports, _ = self._set_up(nodes)
        back = sorted(cid for cid, report in reports.items() if "error" not in report)
        self.restarted -= set(back)
        return back

    def dispatch(self, outgoing: Collection[tuple[int, Payload]]) -> list[tuple[int, Payload]]:
        """Send one message per client (training, or evaluation when the payload says so) and return the
        replies that arrived, in the order sent."""
        outgoing = list(outgoing)  # every message goes to the SuperLink at once
        messages = [
            Message(
                pack(p, train=True),
                dst_node_id=self.node_of[cid],
                message_type=MessageType.EVALUATE if p.meta.get("evaluate") else MessageType.TRAIN,
            )
            for cid, p in outgoing
        ]
        timeout = self.timeouts[min(self.calls, 1)]
        self.calls += 1
        what = "evaluation" if any(p.meta.get("evaluate") for _, p in outgoing) else "training"
        clients = [cid for cid, _ in outgoing]
        answered = exchange(self.grid, messages, timeout, f"the {what} replies of clients {clients}")
        self.measured["flower_bytes_down"] += sum(content_bytes(m.content) for m in messages)
        payloads: list[tuple[int, Payload]] = []
        for i, (cid, _) in enumerate(outgoing):
            reply = answered[i]
            if reply is None:
                self.listener(ClientDropped(cid, f"no reply within {timeout:g} s"))
                continue
            if reply.has_error():
                if reply.error.code == ErrorCode.NODE_UNAVAILABLE or NO_RUN_STATE in reply.error.reason:
                    # A node Flower lost may come back, restarted and empty: set it up again before the
                    # next message, or that message fails too (it would hold no run state).
                    self.restarted.add(cid)
                self.listener(ClientDropped(cid, f"node error: {reply.error.reason}"))
                continue
            self.measured["flower_bytes_up"] += content_bytes(reply.content)
            try:
                payloads.append((cid, unpack(reply.content)))
            except (KeyError, ValueError) as err:
                self.listener(ClientDropped(cid, f"unreadable reply: {err}"))
                continue
            metrics = reply.content.metric_records.get(METRICS, {})
            self.measured["client_s"] += float(metrics.get(CLIENT_SECONDS, 0.0))
        return payloads

    def dispatch_secure(
        self, outgoing: Collection[tuple[int, Payload]], secure_round: SecureRound
    ) -> list[tuple[int, Payload]]:
        """Training messages through SecAgg+ (fedmml.engines.flower.secure): the headers of the clients whose
        masked updates went into ``secure_round.mean``. Flower's bytes count all four of its stages."""
        outgoing = list(outgoing)
        client_of = {self.node_of[cid]: cid for cid, _ in outgoing}
        timeout = self.timeouts[min(self.calls, 1)]
        self.calls += 1
        counted = _CountingGrid(self.grid, self.measured)
        instructions = [(self.node_of[cid], p) for cid, p in outgoing]
        headers = secure.sum_round(counted, instructions, secure_round, self.cfg.privacy, timeout)
        replies: list[tuple[int, Payload]] = []
        for node, cid in client_of.items():
            if node not in headers:
                self.listener(ClientDropped(cid, "its masked update did not reach the secure sum"))
                continue
            header, client_s = secure.header_of(headers[node])
            # What the client uploaded for the protocol (keys, shares, masked update) is its update's cost.
            header.meta[SECURE_BYTES_UP] = counted.up.get(node, 0)
            self.measured["client_s"] += client_s
            replies.append((cid, header))
        return replies

    def resume(self, server: Server, state: dict[str, Any]) -> None:
        """A resumed run is a new Flower run: its nodes start with empty state and hold no frozen tensors."""
        server.ledger.held.clear()

    def state_dict(self) -> dict[str, Any]:
        """Nothing of its own to restore: a resumed run starts on fresh nodes."""
        return {}

    def take_metrics(self) -> dict[str, Any]:
        """Flower's bytes and the clients' own handling time since the last call (one round)."""
        measured, self.measured = self.measured, self._zero()
        return measured


def _log_event(event: Event) -> None:
    if isinstance(event, RoundDone):
        loss = event.record.get("train_loss", float("nan"))
        log.info("fedmml round %s: loss %.4f %s", event.record["round"], loss, event.scores)
    elif isinstance(event, StageStarted):
        log.info("fedmml stage %s/%s", event.stage, event.stages)
    elif isinstance(event, ClientDropped):
        log.warning("fedmml client %s dropped: %s", event.client, event.reason)
    elif isinstance(event, RoundSkipped):
        log.warning("fedmml round %s skipped: only %s valid updates", event.round, event.accepted)
    elif isinstance(event, Notice):
        log.warning("fedmml note: %s", event.text)


def _default_run_dir(cfg: Config) -> Path:
    return Path.cwd() / "runs" / f"flower-{cfg.preset}-{cfg.run.method}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured experiment over the connected nodes and write the run directory."""
    started = time.perf_counter()
    rc = context.run_config
    # Resolved before anything is sent, so every node builds the same model (and labels the same classes).
    cfg = resolve_classes(resolve_config(rc))
    out_dir = Path(str(rc["run-dir"])) if rc.get("run-dir") else _default_run_dir(cfg)
    log.info("fedmml: %s on %s clients, writing %s", cfg.run.method, cfg.federation.num_clients, out_dir)
    if bool(rc.get("resume", False)):
        _, (tensors, state), record = reopen_run(out_dir, _log_event)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        record = start_run(cfg, out_dir, _log_event)
        tensors, state = {}, None
    side = build_server(cfg, record, out_dir / CHECKPOINTS)
    if state is not None:
        side.server.resume(tensors, state)
    metrics = side.server.run(GridEngine(grid, cfg, dict(rc), record))
    finish_run(cfg, out_dir, side, metrics, started, record)
