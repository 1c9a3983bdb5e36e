"""The server: stage progression, client sampling, what to send each client, aggregation, metrics.

Engine-agnostic: an :class:`Engine` (in-process, Flower simulation, Flower deployment) sets the clients up and
delivers one message per sampled client (in-process: direct calls; Flower: ``grid.send_and_receive``). The
server holds no training data: it knows its clients by id and by what they report (sizes, skip counts).
"""

from __future__ import annotations

import base64
import functools
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedmml.config import Config
from fedmml.events import (
    Backfill,
    ClientDropped,
    Listener,
    Notice,
    Phase,
    RoundDone,
    RoundSkipped,
    RoundStarted,
    StageStarted,
    ignore,
)
from fedmml.federation import SetupFailed, budgets, neck_fit
from fedmml.federation.aggregate import AGGREGATORS, RunningMean
from fedmml.federation.checkpoint import save_checkpoint
from fedmml.federation.client import derive_seed, stage_to_meta
from fedmml.federation.neck_fit import NeckFit
from fedmml.federation.payload import (
    Message,
    PayloadError,
    from_delta,
    pack,
    unpack,
    upload_parts,
    validate,
)
from fedmml.federation.privacy import Privacy, PrivateSum
from fedmml.federation.secure import SECURE_BYTES_UP, SecureRound, fold, rounded_bound
from fedmml.methods import Stage, configure, trainable_keys, without_towers
from fedmml.models.multimodal import MultimodalModel
from fedmml.tasks import task_for

Evaluator = Callable[[MultimodalModel], dict[str, Any]]
SlicePeaks = dict[int, dict[str, int]]  # stage index -> slice -> measured client peak bytes


class Engine(Protocol):
    """How the server reaches its clients: in-process calls, Flower's simulation runtime, or a deployment."""

    def setup(self) -> dict[int, dict[str, Any]]:
        """Set every client up; per client id, its data description (``num_samples``, ``skipped``, ...), or
        ``{"error": line}`` for a client that could not open its data."""

    def dispatch(self, outgoing: Collection[tuple[int, Message]]) -> Iterable[tuple[int, Message]]:
        """Deliver one message per client; give the replies that arrived (failed clients send none), each as
        soon as it is there when the engine can (the server takes it in before the next one comes)."""

    def dispatch_secure(
        self, outgoing: Collection[tuple[int, Message]], secure: SecureRound
    ) -> Iterable[tuple[int, Message]]:
        """Deliver training messages under secure aggregation (privacy.secure_aggregation; the Flower engines
        only): give the headers of the replies whose updates went into ``secure.mean``, which it sets."""

    def resume(self, server: Server, state: dict[str, Any]) -> None:
        """Restore the engine's state saved by :meth:`state_dict` when ``server`` continues a run."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue exactly (fault streams, cached measurements, ...)."""

    def take_metrics(self) -> dict[str, Any]:
        """What the engine measured since the last call (one round): client time, its own byte counts."""

    def lost_state(self) -> list[int]:
        """Clients that lost every tensor they held since the last call (a restarted device), set up again;
        the server sends them their frozen tensors anew."""


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


class Outgoing:
    """A round's messages, each made when the engine takes it: an engine that delivers one at a time (the
    in-process one) holds one client's payload, not every client's at once."""

    def __init__(self, cids: list[int], make: Callable[[int], Message]) -> None:
        self.cids = cids
        self.make = make

    def __len__(self) -> int:
        return len(self.cids)

    def __iter__(self) -> Iterator[tuple[int, Message]]:
        for cid in self.cids:
            yield cid, self.make(cid)


@dataclass
class _Tally:
    """What one round's messages cost and what went wrong, summed over its waves and retries."""

    bytes_up: int = 0
    bytes_down: int = 0
    flops: int = 0
    cache_bytes: int = 0
    unreadable: int = 0
    cache_notes: dict[int, str] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    backfilled: list[int] = field(default_factory=list)

    def add(self, sent: list[int], replies: dict[int, Message], cids: list[int]) -> None:
        """Count one wave of messages (``sent``: their sizes) and the replies that came back from ``cids``."""
        for cid, reply in replies.items():
            self.reply(cid, reply)
        self.wave(sent, cids, set(replies))

    def reply(self, cid: int, reply: Message) -> None:
        """Count one reply (its bytes still attached; under secure aggregation, what its header says the
        client uploaded for the protocol)."""
        self.bytes_up += reply.nbytes + reply.meta.get(SECURE_BYTES_UP, 0)
        # Cost counts every client that trained and replied, whether or not its update was accepted.
        self.flops += reply.meta.get("flops", 0)
        self.cache_bytes = max(self.cache_bytes, reply.meta.get("cache_bytes", 0))
        if reply.meta.get("cache_note"):
            self.cache_notes[cid] = reply.meta["cache_note"]
        self.unreadable += reply.meta.get("unreadable_images", 0)

    def wave(self, sent: list[int], cids: list[int], replied: set[int]) -> None:
        """Count one wave's messages (``sent``: their sizes) and which of ``cids`` did not reply."""
        self.bytes_down += sum(sent)
        self.failed += [cid for cid in cids if cid not in replied]


class Server:
    """Holds the global model and runs the stages of one method."""

    def __init__(
        self,
        cfg: Config,
        model: MultimodalModel,
        stages: list[Stage],
        evaluate: Evaluator | None = None,
        listener: Listener | None = None,
        checkpoint_dir: Path | None = None,
        measure_slices: Callable[[], SlicePeaks] | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.stages = stages
        self.evaluate = evaluate
        self.listener = listener or ignore
        self.checkpoint_dir = checkpoint_dir
        self.ledger = Ledger()
        self.rng = np.random.default_rng(derive_seed(cfg.run.seed, 1))
        self.metrics: list[dict[str, Any]] = []
        self.total_rounds = sum(s.rounds for s in stages)
        self.done_rounds = 0
        self._parts_by_stage: dict[int, dict[str, int]] = {}
        # What each client reported at set-up (only sizes and skip counts), and why others could not start.
        self.clients: dict[int, dict[str, Any]] = {}
        self.absent: dict[int, list[str]] = {}
        self.setup_failures: dict[int, str] = {}
        self._engine_state: dict[str, Any] | None = None  # a checkpoint's engine state, until run() starts
        # A checkpoint's digest of each client's data; a resume on changed data stops unless this is set.
        self._fingerprints: dict[int, str | None] = {}
        self.allow_data_change = False
        self.data_changed: list[int] = []
        # A client's peak training memory, measured once per stage by the client the server asks (the first of
        # the stage's first wave, again in later waves until one replies), so the figure is the same whichever
        # engine or process ran that client. Under memory budgets every client measures its own, once per
        # stage (client_peaks), and the stage's figure is the largest.
        self.stage_peaks: dict[int, int] = {}
        self.client_peaks: dict[int, dict[int, int]] = {}
        # Memory budgets (fedmml.federation.budgets): each slice's peak measured on the server per stage, the
        # slice each client trains per stage, and the current stage's plan and per-client trainable keys.
        self.measure_slices = measure_slices
        self.limits: dict[int, float] = {}  # MiB per client, 0: none
        self.budgeted = False
        self.plans: dict[int, dict[int, str]] = {}
        self.plan: dict[int, str] = {}
        self.client_keys: dict[int, list[str]] = {}
        # Client-level differential privacy (fedmml.federation.privacy), when asked for.
        self.privacy = Privacy(cfg) if cfg.privacy.enabled else None
        self.privacy_stop = ""  # why the run stopped before its last round (privacy.max_epsilon)
        # Secure aggregation: the engine hands each round's updates over as one sum (federation.secure).
        self.secure = cfg.privacy.secure_aggregation

    def sample_clients(self) -> list[int]:
        """Clients for one round: all set-up ones that train in this stage, or a seeded sample of them without
        replacement."""
        pool = self._pool()
        if self.privacy is not None:
            return self.privacy.sample(pool, self.rng)
        k = self.cfg.federation.clients_per_round or len(pool)
        if k >= len(pool):
            return pool
        return sorted(int(c) for c in self.rng.choice(pool, size=k, replace=False))

    def open_clients(self, engine: Engine) -> None:
        """Set the clients up through ``engine``; those that fail are left out of every round."""
        reports = engine.setup()
        self.clients = {cid: r for cid, r in sorted(reports.items()) if "error" not in r}
        self.setup_failures = {cid: str(r["error"]) for cid, r in sorted(reports.items()) if "error" in r}
        # The modalities none of a client's samples hold (a unimodal client), for the clients lacking any.
        towers = {
            cid: [m for m in self.model.encoders if m not in report.get("modalities", self.model.encoders)]
            for cid, report in self.clients.items()
        }
        self.absent = {cid: absent for cid, absent in towers.items() if absent}
        for cid, reason in self.setup_failures.items():
            self.listener(ClientDropped(cid, reason))
        need = self.cfg.federation.min_clients
        batch = self.cfg.federation.batch_size
        largest = max((r["num_samples"] for r in self.clients.values()), default=batch)
        if largest < batch:
            raise SetupFailed(
                f"federation.batch_size = {batch} is more than any client holds (the largest holds {largest} "
                "training samples): every step would take a smaller batch; lower it or give clients more data"
            )
        limit = self.cfg.data.limit_train
        held = {cid: r["num_samples"] for cid, r in self.clients.items()}
        if self.cfg.partition.kind == "local" and limit:
            # In a simulation the limit cuts the shared split before it is partitioned; here there is none.
            self.listener(
                Notice(
                    f"data.limit_train = {limit} limits each client's own folder (partition.kind = local): "
                    f"{len(self.clients)} clients train on {sum(held.values())} samples in all"
                )
            )
        if len(self.clients) < need:
            first = next(iter(self.setup_failures.values()), "no client answered")
            raise SetupFailed(
                f"only {len(self.clients)} of {len(reports)} clients could be set up (federation.min_clients "
                f"= {need}); {first}"
            )

    def check_data(self) -> None:
        """After a resume: refuse data that changed since the run started (the result would match neither
        run), unless :attr:`allow_data_change`; then say so and record it in the next round's line."""
        changed = sorted(
            cid
            for cid, before in self._fingerprints.items()
            if before is not None and self.clients.get(cid, {}).get("fingerprint", before) != before
        )
        if not changed:
            return
        if not self.allow_data_change:
            raise SetupFailed(
                f"the training data of clients {changed} changed since the run started; resume it on the "
                "data it started with, or pass --allow-data-change to go on with the new data"
            )
        self.listener(
            Notice(f"going on with changed training data on clients {changed} (--allow-data-change)")
        )
        self.data_changed = changed

    def _pool(self) -> list[int]:
        """Set-up clients that train in the current stage: not those whose budget fits nothing, nor those
        with no training sample (a unimodal client when incomplete samples are dropped)."""
        return [
            c
            for c, report in sorted(self.clients.items())
            if self.plan.get(c) != budgets.OUT and report.get("num_samples", 1) > 0
        ]

    def plan_budgets(self) -> None:
        """Plan every stage's slice per client from the clients' budgets and the slices' measured peaks;
        fails before training when a stage would have too few clients."""
        self.limits = limits = budgets.client_budgets(self.cfg, self.clients)
        self.budgeted = budgets.limited(limits)
        slices = budgets.slices_of(self.cfg)
        if not self.budgeted and slices == (self.cfg.run.method,):
            return  # every client trains the method's own slice
        if self.budgeted:
            if self.measure_slices is None:
                raise ValueError("memory budgets need the server's measure_slices")
            self.listener(Phase("measuring the client memory of each slice"))
            peaks = self.measure_slices()
        else:  # no budget: every client trains the deepest slice, and nothing needs measuring
            peaks = {s.index: dict.fromkeys(slices, 0) for s in self.stages if s.rounds}
        self.plans = {stage: budgets.plan_stage(limits, p, slices) for stage, p in peaks.items()}
        budgets.check_plans(self.plans, peaks, self.cfg.federation.min_clients)

    def narrow(self, stage: Stage, trainable: list[str]) -> list[str]:
        """The stage's trainable keys once each client has its slice: per client in :attr:`client_keys`, and
        for the global model the deepest slice planned (slices nest, so it holds every other). A client whose
        data lacks a modality entirely trains nothing of that modality's tower."""
        self.plan = self.plans.get(stage.index, {})
        self.client_keys = {}
        planned = [s for s in budgets.slices_of(self.cfg) if s in self.plan.values()]
        if planned:
            keys = {s: trainable_keys(self.model, budgets.slice_method(s), stage) for s in planned}
            self.client_keys = {c: keys[s] for c, s in self.plan.items() if s != budgets.OUT}
            trainable = configure(self.model, budgets.slice_method(planned[0]), stage)
        for cid, absent in self.absent.items():
            self.client_keys[cid] = without_towers(self.client_keys.get(cid, trainable), absent)
        return trainable

    def message_for(
        self,
        cid: int,
        stage: Stage,
        round_no: int,
        trainable: list[str],
        evaluate: bool = False,
        measure_memory: bool = False,
        neck_fit: NeckFit | None = None,
        secure: SecureRound | None = None,
        blobs: Callable[[tuple[str, ...]], bytes] | None = None,
    ) -> tuple[Message, list[str]]:
        """The trainable tensors plus the frozen tensors this client lacks (also returned, by name); with
        ``evaluate``, an instruction to score them on the client's own held-out split instead of training;
        with ``measure_memory``, to measure its peak training memory; with ``neck_fit``, to send the sums
        that fit the rebuilt necks (the previous necks travel with the model); with ``secure``, to send its
        change for a secure sum. ``blobs`` (from :meth:`packer`) packs a selection of the model's tensors."""
        state = self.model.state_dict()
        trainable = self.client_keys.get(cid, trainable)
        trainable_set = set(trainable)
        frozen = [k for k in state if k not in trainable_set]
        if not evaluate:
            # A unimodal client never runs the other towers when it trains: they are sent only when it
            # evaluates (on its complete held-out pairs).
            frozen = without_towers(frozen, self.absent.get(cid, []))
        missing_frozen = self.ledger.lacking(cid, frozen)
        names = tuple(trainable + missing_frozen)
        if neck_fit is None:
            blob = (blobs or self.packer())(names)
        else:
            blob = pack({**{k: state[k] for k in names}, **neck_fit.previous}, self.cfg.transport.dtype)
        fed = self.cfg.federation
        meta = {
            "round": round_no,
            "stage": stage_to_meta(stage),
            "method": budgets.slice_method(self.plan[cid]) if cid in self.plan else self.cfg.run.method,
            "seed": derive_seed(self.cfg.run.seed, round_no, cid),
            "local_epochs": fed.local_epochs,
            # The client decodes with it and encodes its reply alike (a Flower ClientApp has no config).
            "transport": self.cfg.transport.dtype,
        }
        if evaluate:
            meta["evaluate"] = True
        elif self.privacy is not None:
            meta["clip"] = self.privacy.bound  # the client clips its change to this before it replies
            meta["stats_share"] = self.cfg.privacy.stats_share
            if secure is not None:
                meta["clip"] = rounded_bound(self.privacy.bound, secure.dims)
        if secure is not None:
            meta["secure"] = secure.instruction()
        if neck_fit is not None:
            meta["neck_fit"] = neck_fit.depths
        if measure_memory:
            meta["measure_memory"] = True
        return Message(meta, blob), missing_frozen

    def packer(self) -> Callable[[tuple[str, ...]], bytes]:
        """Packs a selection of the model's tensors as they are now (the model must not change while it is
        used). A round sends most clients one of a few selections (the trainable slice, with or without the
        frozen tensors a new client lacks): each is packed once, a few kept at a time, where packing the
        frozen encoders again for each of a thousand new clients took a tenth of the round."""
        state = self.model.state_dict()
        dtype = self.cfg.transport.dtype

        @functools.lru_cache(maxsize=4)
        def blob(names: tuple[str, ...]) -> bytes:
            return pack({k: state[k] for k in names}, dtype)

        return blob

    def _eval_due(self, round_no: int) -> bool:
        every = self.cfg.eval.every
        last = round_no == self.total_rounds or not self._affords_another()
        return last or (every > 0 and round_no % every == 0)

    def _affords_another(self) -> bool:
        """Whether one more noised round stays within privacy.max_epsilon (always, without privacy)."""
        return self.privacy is None or self.privacy.affords(self.privacy.rounds + 1)

    def _bind_privacy(self) -> None:
        """Set the accountant for the clients set up, solve the noise under privacy.target_epsilon, and say
        what the run will spend; refuse a cap the next round would already pass."""
        if self.privacy is None:
            return
        privacy = self.privacy
        privacy.bind(len(self._pool()), self.total_rounds)
        p = self.cfg.privacy
        planned = privacy.epsilon(self.total_rounds - self.done_rounds + privacy.rounds)
        solved = f" (solved for epsilon {p.target_epsilon:g})" if p.target_epsilon else ""
        self.listener(
            Notice(
                f"client-level DP: noise multiplier {privacy.noise_multiplier:.4g}{solved}, {p.sampling} "
                f"sampling at rate {privacy.rate:.4g}, clip {privacy.bound:.4g} ({p.clipping}); "
                f"{self.total_rounds} rounds reach epsilon {planned:.4g} at delta {p.delta:g}"
            )
        )
        if not self._affords_another():
            raise SetupFailed(
                f"privacy.max_epsilon = {p.max_epsilon:g} is spent: round {privacy.rounds + 1} would reach "
                f"epsilon {privacy.epsilon(privacy.rounds + 1):.4g}"
            )

    def enter_stage(self, stage: Stage) -> list[str]:
        """Grow the global model to ``stage``, set what trains, track new tensors; return trainable keys."""
        # A norm or neck that growth rebuilds starts from draws of its own, (run seed, stage): not from
        # whatever the process drew before (in-process clients train here, worker processes elsewhere, and a
        # resumed run has drawn nothing yet).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.cfg.run.seed, 3, stage.index))
            for modality, depth in stage.depth.items():
                self.model.encoders[modality].grow_to(depth)
        trainable = configure(self.model, self.cfg.run.method, stage)
        self.ledger.track(self.model.state_dict())
        return trainable

    # Checkpoints -----------------------------------------------------------------------------------------
    def snapshot(self, round_no: int, engine: Engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue after ``round_no`` exactly as if the run had not stopped."""
        state = {
            "round": round_no,
            "method": self.cfg.run.method,
            "metrics": self.metrics,
            "rng": self.rng.bit_generator.state,
            "stage_peaks": {str(k): v for k, v in self.stage_peaks.items()},
            "client_peaks": {str(s): {str(c): b for c, b in p.items()} for s, p in self.client_peaks.items()},
            "engine": engine.state_dict(),
            "privacy": self.privacy.state_dict() if self.privacy is not None else None,
            # What each client's data was: a resume on other data is refused (see check_data).
            "fingerprints": {str(c): r.get("fingerprint") for c, r in self.clients.items()},
            "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "ledger": {
                "versions": self.ledger.versions,
                "shapes": {k: list(v) for k, v in self.ledger.shapes.items()},
                "held": {str(c): h for c, h in self.ledger.held.items()},
            },
        }
        return self.model.state_dict(), state

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        if state["method"] != self.cfg.run.method:
            raise ValueError(f"checkpoint is for method {state['method']!r}, not {self.cfg.run.method!r}")
        self.model.load_state_dict(tensors, strict=True)
        self.metrics = list(state["metrics"])
        self.rng.bit_generator.state = state["rng"]
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])
        self.stage_peaks = {int(k): v for k, v in state.get("stage_peaks", {}).items()}
        self.client_peaks = {
            int(s): {int(c): b for c, b in p.items()} for s, p in state.get("client_peaks", {}).items()
        }
        raw = np.frombuffer(base64.b64decode(state["torch_rng"]), dtype=np.uint8).copy()
        torch.set_rng_state(torch.from_numpy(raw))
        ledger = state["ledger"]
        self.ledger = Ledger(
            dict(ledger["versions"]),
            {k: tuple(v) for k, v in ledger["shapes"].items()},
            {int(c): dict(h) for c, h in ledger["held"].items()},
        )

    def held_tensors(self, cid: int) -> dict[str, torch.Tensor]:
        """Frozen tensors the ledger says ``cid`` holds at their current version (to rebuild a client)."""
        state = self.model.state_dict()
        held = self.ledger.held.get(cid, {})
        return {
            k: state[k].clone() for k, v in held.items() if k in state and self.ledger.versions.get(k) == v
        }

    # The loop --------------------------------------------------------------------------------------------
    def resume(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Continue from a checkpoint: grow to its stage, restore weights, RNG streams, ledger and metrics."""
        self.done_rounds = state["round"]
        rounds_before = 0
        for stage in self.stages:
            self.enter_stage(stage)
            rounds_before += stage.rounds
            if rounds_before >= self.done_rounds:
                break
        self._restore(tensors, state)
        self._engine_state = state.get("engine", {})
        self._fingerprints = {int(c): f for c, f in state.get("fingerprints", {}).items()}

    def run(self, engine: Engine) -> list[dict[str, Any]]:
        """Set the clients up and run every stage (after :meth:`resume`, only rounds not yet done); return the
        per-round metrics."""
        self.open_clients(engine)
        self.check_data()
        if self._engine_state is not None:
            engine.resume(self, self._engine_state)
            self._engine_state = None
        self.plan_budgets()
        if self.secure and (self.budgeted or self.absent):
            why = (
                "memory budgets" if self.budgeted else f"clients {sorted(self.absent)} that hold one modality"
            )
            raise SetupFailed(f"privacy.secure_aggregation sums one slice for every client, not with {why}")
        self._bind_privacy()
        round_no = 0
        fit = NeckFit()
        for stage in self.stages:
            if self.privacy_stop:
                break
            if round_no + stage.rounds < self.done_rounds:
                round_no += stage.rounds
                continue
            if neck_fit.enabled(self.cfg) and round_no > 0:
                # Necks this growth rebuilds are fitted to the last trained ones at the next round trained
                # (stages without rounds in between keep the target).
                fit.add(self.model, stage.depth)
            trainable = self.narrow(stage, self.enter_stage(stage))
            self.listener(StageStarted(stage.index + 1, len(self.stages), stage.rounds))
            for _ in range(stage.rounds):
                round_no += 1
                if round_no <= self.done_rounds:
                    continue
                if not self._affords_another():
                    self.privacy_stop = (
                        f"stopped before round {round_no} of {self.total_rounds}: it would take epsilon past "
                        f"privacy.max_epsilon = {self.cfg.privacy.max_epsilon:g}"
                    )
                    self.listener(Notice(self.privacy_stop))
                    break
                pending = fit if fit.depths else None
                self.metrics.append(self._round(engine, stage, round_no, trainable, pending))
                fit = NeckFit()
                if self.checkpoint_dir is not None:
                    tensors, state = self.snapshot(round_no, engine)
                    save_checkpoint(
                        self.checkpoint_dir, round_no, tensors, state, self.cfg.run.keep_checkpoints
                    )
        if self.privacy is not None and (advice := self.privacy.clip_advice()):
            self.listener(Notice(advice))
        return self.metrics

    def check_update(self, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
        """Why an update must be rejected (keys, shapes, dtypes, non-finite values, norm bound), or None."""
        try:
            validate(tensors, expected)
        except PayloadError as err:
            return str(err)
        for key, value in tensors.items():
            # A float64 sum is non-finite exactly when a value is (no float32 or narrower tensor can overflow
            # it), and needs no mask: 18-32 ms against isfinite's 42-51 ms on e2e's 5.8 M values (RESULTS).
            if value.is_floating_point() and not math.isfinite(value.sum(dtype=torch.float64)):
                return f"non-finite values in {key}"
        bound = self.cfg.federation.max_update_norm
        if bound > 0:
            floats = [k for k, v in expected.items() if v.is_floating_point()]
            delta = torch.sqrt(sum(((tensors[k] - expected[k]).double() ** 2).sum() for k in floats))
            norm = torch.sqrt(sum((expected[k].double() ** 2).sum() for k in floats))
            if delta > bound * norm:
                return f"update norm {delta:.3g} exceeds {bound} x the global norm {norm:.3g}"
        return None

    def _round(
        self, engine: Engine, stage: Stage, round_no: int, trainable: list[str], fit: NeckFit | None = None
    ) -> dict[str, Any]:
        start = time.perf_counter()
        fed = self.cfg.federation
        trainable_set = set(trainable)
        tally = _Tally()
        fitted: dict[str, Any] = {}
        retries = -1
        while retries < fed.round_retries:
            retries += 1
            cids = self.sample_clients()
            self.listener(RoundStarted(round_no, self.total_rounds, cids))
            if fit is not None and not fitted:
                # The round's clients fit the rebuilt necks first; their work and bytes are the round's.
                fitted = self._fit_necks(engine, cids, stage, round_no, trainable, fit, tally)
            expected = {k: v for k, v in self.model.state_dict().items() if k in trainable_set}
            # FedAvg folds each update in as it arrives; the robust aggregators need them all at once.
            mean: RunningMean | PrivateSum | None = RunningMean() if fed.aggregator == "fedavg" else None
            if self.privacy is not None:
                mean = self.privacy.start()
            accepted = self._wave(engine, cids, stage, round_no, trainable, expected, tally, mean)
            asked = set(cids)
            for _ in range(fed.backfill):
                replacements = self._replacements(len(cids) - len(accepted), asked)
                if not replacements:
                    break
                self.listener(Backfill(round_no, replacements))
                tally.backfilled += replacements
                asked.update(replacements)
                accepted += self._wave(
                    engine, replacements, stage, round_no, trainable, expected, tally, mean
                )
            if len(accepted) >= fed.min_clients:
                break
        record: dict[str, Any] = {
            "round": round_no,
            "stage": stage.index + 1,
            "method": self.cfg.run.method,
            "clients": sorted(cid for cid, _, _ in accepted),
            "failed_clients": sorted(set(tally.failed)),
            "rejected_clients": {str(c): r for c, r in tally.rejected.items()},
            "retries": retries,
            "backfilled_clients": sorted(tally.backfilled),
            "bytes_up": tally.bytes_up,
            "bytes_down": tally.bytes_down,
            # Measured by the clients on their real training steps (fedmml.accounting).
            "client_flops": tally.flops,
            "client_peak_mem_bytes": self.stage_peaks.get(stage.index, 0),
            # The largest frozen-prefix cache a client held (memory or disk, as cache.store says).
            "client_cache_bytes": tally.cache_bytes,
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            # What one client's update carries, by part of the model (tensor bytes on the wire).
            "upload_parts": self._upload_parts(stage, expected, trainable),
        }
        if fitted:
            record["neck_fit"] = fitted
        if self.plan:
            record["client_plans"] = {str(c): s for c, s in sorted(self.plan.items())}
            peaks = self.client_peaks.get(stage.index, {})
            record["client_peak_mem"] = {str(c): peaks[c] for c in record["clients"] if c in peaks}
        if self.data_changed:
            record["data_changed_clients"], self.data_changed = self.data_changed, []
        if round_no == 1 and self.setup_failures:
            record["setup_failures"] = {str(c): r for c, r in self.setup_failures.items()}
        if tally.unreadable:
            # Images that failed to read during training: passed over, the batch filled with the next sample.
            record["unreadable_images"] = tally.unreadable
        if tally.cache_notes:
            record["cache_notes"] = {str(c): n for c, n in tally.cache_notes.items()}
        if len(accepted) >= fed.min_clients:
            record.update(self._aggregate(accepted, mean, expected, round_no))
        else:
            record["skipped"] = True
            self.listener(RoundSkipped(round_no, len(accepted)))
        record.update(engine.take_metrics())
        if self._eval_due(round_no):
            evaluating = time.perf_counter()
            if self.cfg.eval.where == "federated":
                clients = record["clients"]
                record.update(self._evaluate_on_clients(engine, stage, round_no, trainable, clients))
            elif self.evaluate is not None:
                record.update(self.evaluate(self.model))
            record["evaluation"] = self.cfg.eval.where
            record["eval_s"] = time.perf_counter() - evaluating
        record["wall_s"] = time.perf_counter() - start
        self.listener(RoundDone(record, task_for(self.cfg).describe_scores(record)))
        return record

    def _wave(
        self,
        engine: Engine,
        cids: list[int],
        stage: Stage,
        round_no: int,
        trainable: list[str],
        expected: dict[str, torch.Tensor],
        tally: _Tally,
        mean: RunningMean | PrivateSum | None = None,
    ) -> list[tuple[int, dict[str, torch.Tensor] | None, Message]]:
        """Send one message to each of ``cids``; return the updates that passed validation, each taken in as
        it arrives (into ``mean`` when given, which then keeps the tensors: the list holds None for them)."""
        # Updates are decoded back to the master weights' dtypes before validation and aggregation.
        dtypes = {k: v.dtype for k, v in expected.items()}
        measurers = self._measurers(stage, cids)
        sizes: dict[int, int] = {}
        replied: set[int] = set()
        accepted: list[tuple[int, dict[str, torch.Tensor] | None, Message]] = []
        secure = self._secure_round(expected, cids) if self.secure else None
        replies = self._replies(
            engine, cids, stage, round_no, trainable, sizes, measurers=measurers, secure=secure
        )
        for cid, reply in replies:
            replied.add(cid)
            tally.reply(cid, reply)
            peak = int(reply.meta.get("peak_mem_bytes", 0))
            if cid in measurers and peak:
                self.client_peaks.setdefault(stage.index, {})[cid] = peak
                self.stage_peaks[stage.index] = max(self.stage_peaks.get(stage.index, 0), peak)
            if secure is not None:
                accepted.append((cid, None, reply))  # its update is in the sum, folded in below
                continue
            # Decoded, a reply's serialised bytes are let go: a round never holds an update twice.
            tensors = unpack(reply.blob, dtypes)
            reply = Message(reply.meta, b"")
            # A client's update holds its own slice of the round's trainable tensors.
            mine = {k: expected[k] for k in self.client_keys.get(cid, expected)}
            if reply.meta.get("delta"):
                tensors = from_delta(tensors, mine)
            reason = self.check_update(tensors, mine)
            if reason is not None:
                tally.rejected[cid] = reason
                self.listener(ClientDropped(cid, f"update rejected: {reason}"))
                continue
            if isinstance(mean, PrivateSum):
                mean.add(tensors, mine, reply.meta.get("unclipped", True), reply.meta["num_samples"])
                tensors = None
            elif mean is not None:
                mean.add(tensors, reply.meta["num_samples"])
                tensors = None
            accepted.append((cid, tensors, reply))
        tally.wave(list(sizes.values()), cids, replied)
        if secure is not None and accepted:
            assert mean is not None  # fedavg or DP: the config refuses the robust aggregators
            fold(secure, [reply for _, _, reply in accepted], expected, mean)
        return accepted

    def _secure_round(self, expected: dict[str, torch.Tensor], cids: list[int]) -> SecureRound:
        """What a wave to ``cids`` sums securely: every client sends the whole slice, in one key order."""
        privacy = self.privacy
        bound = privacy.bound if privacy is not None else self.cfg.privacy.secagg_range
        return SecureRound(
            keys=sorted(expected),
            dims=sum(v.numel() for v in expected.values() if v.is_floating_point()),
            weighted=privacy is None,
            count_unclipped=privacy is not None and self.cfg.privacy.clipping == "adaptive",
            value_range=bound,
            max_weight=max((int(self.clients[c]["num_samples"]) for c in cids), default=1)
            if privacy is None
            else 1,
        )

    def _measurers(self, stage: Stage, cids: list[int]) -> set[int]:
        """Clients asked to measure their peak memory this wave: under budgets each one's first round of the
        stage; else the first client, until one stage figure is in."""
        if self.budgeted:
            measured = self.client_peaks.get(stage.index, {})
            return {c for c in cids if c not in measured}
        return set() if stage.index in self.stage_peaks or not cids else {cids[0]}

    def _replies(
        self,
        engine: Engine,
        cids: list[int],
        stage: Stage,
        round_no: int,
        trainable: list[str],
        sizes: dict[int, int],
        evaluate: bool = False,
        measurers: Collection[int] = (),
        neck_fit: NeckFit | None = None,
        secure: SecureRound | None = None,
    ) -> Iterator[tuple[int, Message]]:
        """The replies to one message to each of ``cids``, as the engine hands them over (with ``secure``,
        their headers, the updates summed into it); ``sizes`` gets the size of each message sent. Clients
        whose device lost everything since the last exchange are sent their frozen tensors anew."""
        for cid in engine.lost_state():
            self.ledger.held.pop(cid, None)
        frozen: dict[int, list[str]] = {}
        blobs = self.packer()  # the model stays as it is until every reply is in

        def make(cid: int) -> Message:
            message, frozen[cid] = self.message_for(
                cid,
                stage,
                round_no,
                trainable,
                evaluate,
                measure_memory=cid in measurers,
                neck_fit=neck_fit,
                secure=secure,
                blobs=blobs,
            )
            sizes[cid] = message.nbytes
            return message

        outgoing = Outgoing(cids, make)
        replies = engine.dispatch(outgoing) if secure is None else engine.dispatch_secure(outgoing, secure)
        for cid, reply in replies:
            # A client that replied processed the message, so it now holds the frozen tensors sent to it.
            self.ledger.record(cid, frozen[cid])
            yield cid, reply

    def _fit_necks(
        self,
        engine: Engine,
        cids: list[int],
        stage: Stage,
        round_no: int,
        trainable: list[str],
        fit: NeckFit,
        tally: _Tally,
    ) -> dict[str, Any]:
        """Fit the rebuilt necks by least squares on the sums ``cids`` send (fedmml.federation.neck_fit);
        without replies the necks stay as initialised. Returns what the round records of the fit."""
        self.listener(Phase("fitting the rebuilt necks on the clients"))
        sizes: dict[int, int] = {}
        replies = dict(self._replies(engine, cids, stage, round_no, trainable, sizes, neck_fit=fit))
        tally.add(list(sizes.values()), replies, [])
        sums: dict[str, torch.Tensor] = {}
        for reply in replies.values():
            for key, value in unpack(reply.blob).items():
                sums[key] = sums[key] + value.double() if key in sums else value.double()
        samples = sum(int(r.meta.get("neck_fit_samples", 0)) for r in replies.values())
        record: dict[str, Any] = {"clients": sorted(replies), "samples": samples}
        if samples:
            record["encoders"] = neck_fit.solve(self.model, sums, samples)
        return record

    def _evaluate_on_clients(
        self, engine: Engine, stage: Stage, round_no: int, trainable: list[str], cids: list[int]
    ) -> dict[str, Any]:
        """Federated evaluation: the round's clients score the new global model on their own held-out splits,
        and the task combines what they report. Its bytes are counted apart from training's."""
        self.listener(Phase("evaluating on the clients"))
        sizes: dict[int, int] = {}
        replies = dict(self._replies(engine, cids, stage, round_no, trainable, sizes, evaluate=True))
        parts, skipped = [], {}
        for cid, reply in replies.items():
            if "scores" in reply.meta:
                parts.append(reply.meta["scores"])
            else:
                skipped[str(cid)] = reply.meta.get("no_test", "no scores")
        record: dict[str, Any] = {
            "eval_clients": sorted(int(c) for c, r in replies.items() if "scores" in r.meta),
            "eval_skipped_clients": skipped,
            "eval_failed_clients": sorted(set(cids) - set(replies)),
            "eval_bytes_down": sum(sizes.values()),
            "eval_bytes_up": sum(r.nbytes for r in replies.values()),
        }
        if parts:
            record.update(task_for(self.cfg).combine_scores(parts))
        return record

    def _replacements(self, shortfall: int, asked: set[int]) -> list[int]:
        """Up to ``shortfall`` clients not yet asked this round, drawn from the server's seeded stream."""
        pool = [c for c in self._pool() if c not in asked]
        if shortfall <= 0 or not pool:
            return []
        return sorted(int(c) for c in self.rng.choice(pool, size=min(shortfall, len(pool)), replace=False))

    def _upload_parts(
        self, stage: Stage, expected: dict[str, torch.Tensor], trainable: list[str]
    ) -> dict[str, int]:
        # Fixed by the stage's tensor shapes, so encoded once per stage rather than every round.
        if stage.index not in self._parts_by_stage:
            self._parts_by_stage[stage.index] = upload_parts(expected, trainable, self.cfg.transport.dtype)
        return self._parts_by_stage[stage.index]

    def _aggregate(
        self,
        accepted: list[tuple[int, dict[str, torch.Tensor] | None, Message]],
        mean: RunningMean | PrivateSum | None,
        expected: dict[str, torch.Tensor],
        round_no: int,
    ) -> dict[str, Any]:
        fed = self.cfg.federation
        record: dict[str, Any] = {}
        if isinstance(mean, PrivateSum):
            assert self.privacy is not None
            averaged, record["privacy"] = self.privacy.finish(
                mean, expected, self._holders(expected), derive_seed(self.cfg.run.seed, 11, round_no)
            )
        elif mean is not None:
            averaged = mean.result()
        else:
            updates = [(tensors, reply.meta["num_samples"]) for _, tensors, reply in accepted if tensors]
            aggregate = AGGREGATORS[fed.aggregator]
            averaged = (
                aggregate(updates, fed.trim) if fed.aggregator == "trimmed_mean" else aggregate(updates)
            )
        self.model.load_state_dict(averaged, strict=False)
        self.ledger.bump(list(averaged))
        # A client with one sample takes no step (a batch needs two) and has no loss to report; it still
        # took part in the round.
        stepped = [reply.meta for _, _, reply in accepted if reply.meta["steps"]]
        total = sum(meta["num_samples"] for meta in stepped)
        losses = sum(meta["train_loss"] * meta["num_samples"] for meta in stepped)
        record["train_loss"] = losses / total if total else float("nan")
        return record

    def _holders(self, expected: dict[str, torch.Tensor]) -> dict[str, int]:
        """How many clients of the pool train each tensor (their slices differ under budgets or with
        unimodal clients): the sampling rate x this is the tensor's expected number of contributions."""
        holders = dict.fromkeys(expected, 0)
        for cid in self._pool():
            for key in self.client_keys.get(cid, expected):
                holders[key] += 1
        return holders
