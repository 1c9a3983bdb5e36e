"""Several clients at once on one machine: each in a worker process of its own, all sharing its device.

``federation.parallel_clients`` worker processes each hold a fixed share of the clients (client ``c`` lives in
worker ``c mod K``, with its data, its frozen-prefix cache and its gradient scaler, for the whole run) and run
the same :class:`fedmml.federation.client.Client` code as the in-process engine: a client's update depends
only on its message, its data and its seeds, so it equals the one it makes alone. What the workers add is
overlap: on a GPU one client's kernels run while another's host code prepares the next ones (a single
training loop of these models leaves most of a large GPU idle), and their loaders decode in parallel.

The server sees the in-process engine's behaviour: replies are handed over in the order the messages went
out (so FedAvg adds the same updates in the same order), injected faults draw from the same stream in the
same order, deadlines apply to each client's own handling time, and a client that raises is dropped. A worker
process that dies is started again; its clients then report their tensors lost and are sent them anew. The
run's process opens no training data: each worker opens its own clients' shares, as a device would.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Collection, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmml.client_data import ClientDataError, open_client_data, source_of
from fedmml.config import Config, config_from_dict
from fedmml.device import apply_threads, select_device
from fedmml.engines.inprocess import ClientTimes
from fedmml.events import ClientDropped, ClientStarted, Listener, ignore
from fedmml.federation import SetupFailed
from fedmml.federation.client import Client, Workspace, derive_seed
from fedmml.federation.payload import Message, deserialize, serialize
from fedmml.federation.server import Server

MAX_AUTO = 4  # clients at once when chosen from a GPU (pfl-research runs 1-5 processes per GPU)
CORES_PER_CLIENT = 4  # a training loop and its loader's workers


def parallel_clients(cfg: Config, device: torch.device) -> int:
    """How many clients train at once: ``federation.parallel_clients``, or when 0 one on a CPU (processes
    would share its cores with the training itself) and on a GPU up to :data:`MAX_AUTO`, one per
    :data:`CORES_PER_CLIENT` cores; never more than a round's clients."""
    fed = cfg.federation
    per_round = fed.clients_per_round or fed.num_clients
    wanted = fed.parallel_clients
    if wanted == 0:
        cores = os.cpu_count() or 1
        wanted = min(MAX_AUTO, max(1, cores // CORES_PER_CLIENT)) if device.type == "cuda" else 1
    return max(1, min(wanted, per_round))


def _serve(tree: dict[str, Any], cids: list[int], cache_dir: str, processes: int, conn: Connection) -> None:
    """A worker process: open its clients' data, then answer orders until told to stop."""
    # Ctrl-C reaches the whole process group; the run's process decides what happens to the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = _Worker(tree, cids, Path(cache_dir) if cache_dir else None, processes, conn)
    parent = os.getppid()
    while worker.ready:
        if not conn.poll(2.0):
            if os.getppid() != parent:  # the run's process is gone: nobody will read a reply
                break
            continue
        try:
            order = conn.recv()
        except EOFError:
            break
        if order[0] == "stop":
            break
        worker.obey(order)
    worker.close()


class _Worker:
    """What one worker process holds: a workspace and its clients."""

    def __init__(
        self, tree: dict[str, Any], cids: list[int], cache_dir: Path | None, processes: int, conn: Connection
    ) -> None:
        self.conn = conn
        self.clients: dict[int, Client] = {}
        self.workspace: Workspace | None = None
        self.ready = False
        try:
            cfg = config_from_dict(tree)
            apply_threads(cfg)
            self.workspace = Workspace(cfg, select_device(cfg.run.device), cache_dir, processes)
            shared = source_of(cfg)
            if shared is not None:
                shared.store_images(cids)
            reports: dict[int, dict[str, Any]] = {}
            for cid in cids:
                try:
                    data = open_client_data(cfg, cid, shared)
                except ClientDataError as err:
                    reports[cid] = {"error": str(err)}
                    continue
                self.clients[cid] = Client(cid, cfg, data, self.workspace)
                reports[cid] = self.clients[cid].describe()
        except Exception as err:  # noqa: BLE001 - said in one line by the run's process
            conn.send(("failed", f"{type(err).__name__}: {err}"))
            return
        self.ready = True
        conn.send(("ready", reports))

    def obey(self, order: tuple[Any, ...]) -> None:
        """Carry out one order from the run's process and send its answer back."""
        kind = order[0]
        if kind == "handle":
            _, cid, message = order
            client = self.clients[cid]
            client.last_training = None
            started = time.perf_counter()
            try:
                reply = client.handle(message)
            except Exception as err:  # noqa: BLE001 - one failing client must not end the round
                self.conn.send(("error", f"{type(err).__name__}: {err}"))
                return
            elapsed = time.perf_counter() - started
            self.conn.send(("reply", reply, elapsed, client.last_training))
        elif kind == "caches":
            self.conn.send(("caches", self.workspace.caches.state()))
        elif kind == "resume":
            _, caches, held = order
            self.workspace.caches.restore(caches)
            for cid, blob in held.items():
                if cid in self.clients:  # one that could not open its data has nothing to hold
                    self.clients[cid].store = deserialize(blob)
            self.conn.send(("resumed", None))

    def close(self) -> None:
        """Drop the frozen-prefix caches (a disk store's files too)."""
        if self.workspace is not None:
            self.workspace.caches.close()


class _Process:
    """One worker process as the run's process sees it: its clients, its end of the pipe, the client it is
    handling."""

    def __init__(self, index: int, cids: list[int]) -> None:
        self.index = index
        self.cids = cids
        self.process: Any = None
        self.conn: Connection | None = None
        self.busy: int | None = None


class ParallelEngine:
    """Runs each round's clients in ``K`` worker processes at once (see the module's docstring)."""

    def __init__(
        self, cfg: Config, workers: int, listener: Listener | None = None, cache_dir: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.faults = cfg.faults
        self.timeout_s = cfg.federation.client_timeout_s
        self.listener = listener or ignore
        self.rng = np.random.default_rng(derive_seed(cfg.run.seed, 2))
        self.cache_dir = cache_dir
        self.context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        cids = list(range(cfg.federation.num_clients))
        self.workers = [_Process(w, cids[w::workers]) for w in range(workers)]
        self.owner = {cid: worker for worker in self.workers for cid in worker.cids}
        self._lost: set[int] = set()
        self._delays: dict[int, float] = {}  # injected straggler delay of each client in flight
        self.times = ClientTimes()

    # Workers ---------------------------------------------------------------------------------------------
    def _start(self, worker: _Process) -> dict[int, dict[str, Any]]:
        ours, theirs = self.context.Pipe()
        cache_dir = str(self.cache_dir) if self.cache_dir is not None else ""
        args = (self.cfg.to_dict(), worker.cids, cache_dir, len(self.workers), theirs)
        worker.process = self.context.Process(target=_serve, args=args, name=f"fedmml-clients-{worker.index}")
        worker.process.start()
        theirs.close()  # the child's end: once the child is gone, reading ours raises EOFError
        worker.conn = ours
        worker.busy = None
        return self._answer(worker, "ready")

    def _answer(self, worker: _Process, kind: str) -> Any:
        """``worker``'s answer to an order of its own (its clients are not in a round), or a one-line error
        when it cannot give one."""
        try:
            answer = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=10)
            raise SetupFailed(
                f"client worker process {worker.index} exited with code {worker.process.exitcode}"
            ) from None
        if answer[0] == "failed":
            raise SetupFailed(f"client worker process {worker.index} could not start: {answer[1]}")
        assert answer[0] == kind, answer[0]
        return answer[1]

    def setup(self) -> dict[int, dict[str, Any]]:
        """Start every worker; each opens its clients' data and reports what the server may know of it."""
        reports: dict[int, dict[str, Any]] = {}
        for worker in self.workers:
            reports.update(self._start(worker))
        return dict(sorted(reports.items()))

    def close(self) -> None:
        """Stop the workers (a worker still busy with a client is ended after a grace period)."""
        for worker in self.workers:
            if worker.process is not None and worker.process.is_alive():
                try:
                    worker.conn.send(("stop",))
                except OSError:  # it is going already
                    pass
        for worker in self.workers:
            if worker.process is None:
                continue
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=10)
            worker.process = None
            worker.conn.close()

    # Engine protocol -------------------------------------------------------------------------------------
    def resume(self, server: Server, state: dict[str, Any]) -> None:
        """Continue after a checkpoint: the fault stream as it was, each worker's clients holding what the
        ledger says they hold and rebuilding the caches they held."""
        self.load_state_dict(state)
        caches = state.get("caches", {})
        for worker in self.workers:
            mine = {c: v for c, v in caches.items() if int(c) in worker.cids}
            held = {cid: serialize(server.held_tensors(cid)) for cid in worker.cids}
            worker.conn.send(("resume", mine, held))
            self._answer(worker, "resumed")

    def lost_state(self) -> list[int]:
        """Clients of a worker process that died and was started again since the last call."""
        lost, self._lost = sorted(self._lost), set()
        return lost

    def state_dict(self) -> dict[str, Any]:
        """The fault stream and which frozen-prefix cache each client holds, gathered from the workers (the
        in-process engine's format: either engine can continue the other's checkpoint)."""
        caches: dict[str, Any] = {}
        for worker in self.workers:
            worker.conn.send(("caches",))
            caches.update(self._answer(worker, "caches"))
        return {"faults_rng": self.rng.bit_generator.state, "caches": caches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The fault stream of :meth:`state_dict`."""
        self.rng.bit_generator.state = state["faults_rng"]

    def take_metrics(self) -> dict[str, Any]:
        """The clients' times since the last call (see :class:`ClientTimes`: sums over clients, so more than
        the round's wall time when they overlap)."""
        return self.times.take()

    def dispatch(self, outgoing: Collection[tuple[int, Message]]) -> Iterator[tuple[int, Message]]:
        """Hand each client's message to its worker as soon as that worker is free, and give the replies back
        in the order the messages went out, each as soon as it and every earlier one are in."""
        sent: list[int] = []  # in order
        done: dict[int, tuple[Message | None, str]] = {}  # cid -> (reply, why it has none)
        for i, (cid, message) in enumerate(outgoing):
            self.listener(ClientStarted(cid, i + 1, len(outgoing)))
            crash, straggle = self.rng.random(2)
            if crash < self.faults.crash_rate:
                self.listener(ClientDropped(cid, f"InjectedFault: injected crash of client {cid}"))
                continue
            delay = self.faults.straggler_delay_s if straggle < self.faults.straggler_rate else 0.0
            worker = self.owner[cid]
            while worker.busy is not None:
                self._collect(done)
                yield from self._in_order(sent, done)
            worker.busy = cid
            try:
                worker.conn.send(("handle", cid, message))
            except OSError:  # it died since its last answer: _collect sees it and starts it again
                pass
            self._delays[cid] = delay
            sent.append(cid)
        while any(w.busy is not None for w in self.workers):
            self._collect(done)
            yield from self._in_order(sent, done)
        yield from self._in_order(sent, done)

    def _in_order(
        self, sent: list[int], done: dict[int, tuple[Message | None, str]]
    ) -> Iterator[tuple[int, Message]]:
        while sent and sent[0] in done:
            cid = sent.pop(0)
            reply, why = done.pop(cid)
            if reply is None:
                self.listener(ClientDropped(cid, why))
            else:
                yield cid, reply

    def _collect(self, done: dict[int, tuple[Message | None, str]]) -> None:
        """Take the answers the busy workers have given (waiting for one), and notice a worker that died: its
        client is dropped, the worker started again and its clients' tensors counted lost."""
        busy = {w.conn: w for w in self.workers if w.busy is not None}
        for conn in wait(list(busy)):
            worker = busy[conn]
            cid = worker.busy
            worker.busy = None
            delay = self._delays.pop(cid, 0.0)
            try:
                answer = conn.recv()
            except (EOFError, OSError):
                worker.process.join()
                done[cid] = (None, f"its worker process died (exit code {worker.process.exitcode})")
                conn.close()
                self._lost.update(worker.cids)
                self._start(worker)
                continue
            if answer[0] == "error":
                done[cid] = (None, answer[1])
                continue
            _, reply, elapsed, training = answer
            self.times.add(elapsed, training)
            elapsed += delay
            if self.timeout_s and elapsed > self.timeout_s:
                done[cid] = (None, f"missed the {self.timeout_s:g} s deadline ({elapsed:.2f} s)")
            else:
                done[cid] = (reply, "")
