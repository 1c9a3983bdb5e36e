"""The embedded default engine: every client runs in this process, one after another. No servers, no Ray."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmml.config import Config
from fedmml.events import ClientDropped, ClientStarted, Listener, ignore
from fedmml.federation.client import Client, Workspace, derive_seed
from fedmml.federation.payload import Message
from fedmml.federation.server import Server
from fedmml.federation.training import LocalResult


@dataclass
class ClientTimes:
    """Seconds the clients spent handling their messages (summed over clients), in their step loops, and
    waiting there for batches: what an engine measures of a round beside the wall time."""

    client_s: float = 0.0
    train_s: float = 0.0
    data_wait_s: float = 0.0

    def add(self, handled_s: float, training: LocalResult | None) -> None:
        """One client's handling time and, if it trained, its step loop's figures."""
        self.client_s += handled_s
        if training is not None:
            self.train_s += training.train_s
            self.data_wait_s += training.data_wait_s

    def take(self) -> dict[str, float]:
        """The sums since the last call, as a round records them; then start again."""
        out = {
            "client_s": self.client_s,
            "client_train_s": self.train_s,
            "client_data_wait_s": self.data_wait_s,
        }
        self.client_s = self.train_s = self.data_wait_s = 0.0
        return out


class InjectedFault(RuntimeError):
    """A client crash drawn by the fault injector (``faults.crash_rate``)."""


class InProcessEngine:
    """Delivers messages by calling each client directly; payloads still travel as serialised bytes.

    A client that raises, or whose reply takes longer than ``federation.client_timeout_s``, is dropped from
    the round: it sends no reply, as a crashed or late device would not. Injected faults draw from their
    own seeded stream so that they never disturb the training randomness. An injected straggler's delay is
    simulated (added to its measured reply time) rather than slept, so robustness studies cost no wall time.
    """

    def __init__(
        self,
        clients: dict[int, Client],
        failures: dict[int, str],
        cfg: Config,
        workspace: Workspace,
        listener: Listener | None = None,
    ) -> None:
        self.clients = clients
        self.failures = failures
        self.caches = workspace.caches
        self.faults = cfg.faults
        self.timeout_s = cfg.federation.client_timeout_s
        self.listener = listener or ignore
        self.rng = np.random.default_rng(derive_seed(cfg.run.seed, 2))
        self.times = ClientTimes()

    def setup(self) -> dict[int, dict[str, Any]]:
        """Each client's data description, and the clients that could not open their data."""
        reports: dict[int, dict[str, Any]] = {cid: {"error": why} for cid, why in self.failures.items()}
        reports.update({cid: client.describe() for cid, client in self.clients.items()})
        return reports

    def resume(self, server: Server, state: dict[str, Any]) -> None:
        """Continue after a checkpoint: streams and caches as they were, each client holding what the
        ledger says it holds."""
        self.load_state_dict(state)
        for cid, client in self.clients.items():
            client.store = server.held_tensors(cid)

    def lost_state(self) -> list[int]:
        """In-process clients never lose what they hold."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue exactly: the fault stream and which frozen-prefix cache each
        client held (rebuilt after a resume, so later rounds do the same work)."""
        return {
            "faults_rng": self.rng.bit_generator.state,
            "caches": self.caches.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.rng.bit_generator.state = state["faults_rng"]
        self.caches.restore(state.get("caches", {}))

    def take_metrics(self) -> dict[str, Any]:
        """The clients' times since the last call (one round; see :class:`ClientTimes`)."""
        return self.times.take()

    def close(self) -> None:
        """Drop the clients' frozen-prefix caches (a disk store's files too)."""
        self.caches.close()

    def _run_client(self, cid: int, message: Message) -> tuple[Message, float]:
        """The client's reply and its simulated extra delay."""
        crash, straggle = self.rng.random(2)
        if crash < self.faults.crash_rate:
            raise InjectedFault(f"injected crash of client {cid}")
        delay = self.faults.straggler_delay_s if straggle < self.faults.straggler_rate else 0.0
        self.clients[cid].last_training = None
        return self.clients[cid].handle(message), delay

    def dispatch(self, outgoing: Collection[tuple[int, Message]]) -> Iterator[tuple[int, Message]]:
        """Run each addressed client's local training and give the reply of each that succeeded before the
        next client runs: the server folds it in, so a round holds one client's update at a time."""
        for i, (cid, message) in enumerate(outgoing):
            self.listener(ClientStarted(cid, i + 1, len(outgoing)))
            start = time.perf_counter()
            try:
                reply, delay = self._run_client(cid, message)
            except Exception as err:  # noqa: BLE001 - one failing client must not end the round
                self.listener(ClientDropped(cid, f"{type(err).__name__}: {err}"))
                continue
            self.times.add(time.perf_counter() - start, getattr(self.clients[cid], "last_training", None))
            elapsed = time.perf_counter() - start + delay
            if self.timeout_s and elapsed > self.timeout_s:
                reason = f"missed the {self.timeout_s:g} s deadline ({elapsed:.2f} s)"
                self.listener(ClientDropped(cid, reason))
                continue
            yield cid, reply
