"""The server: stage progression, client sampling, what to send each client, aggregation, metrics.

Engine-agnostic: the engine supplies ``dispatch``, which delivers one message per sampled client and returns
their replies (in-process: direct calls; Flower: ``grid.send_and_receive``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmml.config import Config
from fedmml.federation.aggregate import fedavg
from fedmml.federation.client import derive_seed, stage_to_meta
from fedmml.federation.payload import Message, deserialize, serialize, validate
from fedmml.methods import Stage, configure
from fedmml.models.multimodal import DualEncoder

Dispatch = Callable[[list[tuple[int, Message]]], list[tuple[int, Message]]]
Evaluator = Callable[[DualEncoder], dict[str, float]]
Listener = Callable[[str, dict[str, Any]], None]


@dataclass
class Ledger:
    """Which version of each frozen tensor every client holds, so each tensor is sent once per version."""

    versions: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    held: dict[int, dict[str, int]] = field(default_factory=dict)

    def track(self, state: dict[str, torch.Tensor]) -> None:
        """Register new tensors and bump any whose shape changed (a rebuilt neck)."""
        for key, value in state.items():
            if self.shapes.get(key) != tuple(value.shape):
                self.versions[key] = self.versions.get(key, -1) + 1
                self.shapes[key] = tuple(value.shape)

    def bump(self, keys: list[str]) -> None:
        """Mark tensors as changed by aggregation."""
        for key in keys:
            self.versions[key] += 1

    def lacking(self, cid: int, keys: list[str]) -> list[str]:
        """Of ``keys``, those the client does not hold in their current version."""
        held = self.held.get(cid, {})
        return [k for k in keys if held.get(k) != self.versions[k]]

    def record(self, cid: int, keys: list[str]) -> None:
        """The client now holds the current version of ``keys``."""
        held = self.held.setdefault(cid, {})
        held.update({k: self.versions[k] for k in keys})


class Server:
    """Holds the global model and runs the stages of one method."""

    def __init__(
        self,
        cfg: Config,
        model: DualEncoder,
        stages: list[Stage],
        client_sizes: list[int],
        evaluate: Evaluator | None = None,
        listener: Listener | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.stages = stages
        self.client_sizes = client_sizes
        self.evaluate = evaluate
        self.listener = listener or (lambda kind, info: None)
        self.ledger = Ledger()
        self.rng = np.random.default_rng(derive_seed(cfg.run.seed, 1))
        self.metrics: list[dict[str, Any]] = []
        self.total_rounds = sum(s.rounds for s in stages)

    def sample_clients(self) -> list[int]:
        """Clients for one round: all, or a seeded sample without replacement."""
        n = len(self.client_sizes)
        k = self.cfg.federation.clients_per_round or n
        return sorted(int(c) for c in self.rng.choice(n, size=k, replace=False)) if k < n else list(range(n))

    def message_for(self, cid: int, stage: Stage, round_no: int, trainable: list[str]) -> Message:
        """The trainable tensors plus the frozen tensors this client lacks."""
        state = self.model.state_dict()
        trainable_set = set(trainable)
        frozen = [k for k in state if k not in trainable_set]
        missing_frozen = self.ledger.lacking(cid, frozen)
        self.ledger.record(cid, missing_frozen)
        tensors = {k: state[k] for k in trainable + missing_frozen}
        fed = self.cfg.federation
        meta = {
            "round": round_no,
            "stage": stage_to_meta(stage),
            "method": self.cfg.run.method,
            "seed": derive_seed(self.cfg.run.seed, round_no, cid),
            "local_epochs": fed.local_epochs,
        }
        return Message(meta, serialize(tensors))

    def _eval_due(self, round_no: int) -> bool:
        every = self.cfg.eval.every
        return round_no == self.total_rounds or (every > 0 and round_no % every == 0)

    def enter_stage(self, stage: Stage) -> list[str]:
        """Grow the global model to ``stage``, set what trains, track new tensors; return trainable keys."""
        for modality, depth in stage.depth.items():
            self.model.encoders[modality].grow_to(depth)
        trainable = configure(self.model, self.cfg.run.method, stage)
        self.ledger.track(self.model.state_dict())
        return trainable

    def run(self, dispatch: Dispatch) -> list[dict[str, Any]]:
        """Run every stage; return the per-round metrics."""
        round_no = 0
        for stage in self.stages:
            trainable = self.enter_stage(stage)
            self.listener(
                "stage", {"stage": stage.index + 1, "stages": len(self.stages), "rounds": stage.rounds}
            )
            for _ in range(stage.rounds):
                round_no += 1
                self.metrics.append(self._round(dispatch, stage, round_no, trainable))
        return self.metrics

    def _round(self, dispatch: Dispatch, stage: Stage, round_no: int, trainable: list[str]) -> dict[str, Any]:
        start = time.perf_counter()
        cids = self.sample_clients()
        self.listener("round", {"round": round_no, "rounds": self.total_rounds, "clients": cids})
        outgoing = [(cid, self.message_for(cid, stage, round_no, trainable)) for cid in cids]
        replies = dispatch(outgoing)
        trainable_set = set(trainable)
        expected = {k: v for k, v in self.model.state_dict().items() if k in trainable_set}
        updates = []
        for _, reply in replies:
            tensors = deserialize(reply.blob)
            validate(tensors, expected)
            updates.append((tensors, reply.meta["num_samples"]))
        averaged = fedavg(updates)
        self.model.load_state_dict(averaged, strict=False)
        self.ledger.bump(list(averaged))
        total = sum(r.meta["num_samples"] for _, r in replies)
        record: dict[str, Any] = {
            "round": round_no,
            "stage": stage.index + 1,
            "method": self.cfg.run.method,
            "clients": cids,
            "train_loss": sum(r.meta["train_loss"] * r.meta["num_samples"] for _, r in replies) / total,
            "bytes_up": sum(r.nbytes for _, r in replies),
            "bytes_down": sum(m.nbytes for _, m in outgoing),
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            # Measured by the clients on their real training steps (fedmml.accounting).
            "client_flops": sum(r.meta.get("flops", 0) for _, r in replies),
            "client_peak_mem_bytes": max((r.meta.get("peak_mem_bytes", 0) for _, r in replies), default=0),
        }
        if self.evaluate is not None and self._eval_due(round_no):
            record.update(self.evaluate(self.model))
        record["wall_s"] = time.perf_counter() - start
        self.listener("round_done", record)
        return record
