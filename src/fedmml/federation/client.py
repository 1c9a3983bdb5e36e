"""One client's side of a round: merge what the server sent, train locally, return the trainable tensors.

Engine-agnostic: the in-process engine calls :meth:`Client.handle` directly; a Flower ClientApp can call the
same method with the message it received, keeping :attr:`Client.store` in the node's state.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedmml.accounting import StepMeter, count_flops
from fedmml.client_data import ClientData
from fedmml.config import Config
from fedmml.data import missing
from fedmml.federation import neck_fit
from fedmml.federation.payload import Message, PayloadError, lossy, pack, to_delta, unpack
from fedmml.federation.prefix_cache import CacheShelf
from fedmml.federation.privacy import clip_update
from fedmml.federation.secure import changes
from fedmml.federation.training import (
    IndexedSamples,
    LocalResult,
    compile_model,
    indexed_collate,
    train_epochs,
)
from fedmml.methods import Stage, configure, without_towers
from fedmml.models.build import build_model
from fedmml.models.multimodal import MultimodalModel
from fedmml.precision import autocast, grad_scaler
from fedmml.tasks import task_for


def stage_to_meta(stage: Stage) -> dict[str, Any]:
    """A stage as JSON-able metadata."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in asdict(stage).items()}


def stage_from_meta(meta: dict[str, Any]) -> Stage:
    """Inverse of :func:`stage_to_meta`."""
    new = {m: tuple(v) for m, v in meta["new_blocks"].items()}
    return Stage(meta["index"], meta["rounds"], dict(meta["depth"]), new, dict(meta["lr"]))


def derive_seed(*parts: int) -> int:
    """A 31-bit seed derived from several integers (run seed, round, client id, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


class Workspace:
    """A model skeleton without pretrained weights, grown on demand and reused by every client in a process.

    Clients never load pretrained checkpoints themselves: every tensor they use arrives from the server.
    """

    def __init__(
        self, cfg: Config, device: torch.device, cache_dir: Path | None = None, processes: int = 1
    ) -> None:
        self.device = device
        lora = cfg.run.method == "lora"
        self.model: MultimodalModel = build_model(
            cfg.model, load_weights=False, adapters=lora, missing=missing.incomplete(cfg)
        ).to(device)
        if cfg.run.compile:
            compile_model(self.model)
        # Training processes sharing the machine (federation.parallel_clients): their loaders share its cores.
        self.processes = processes
        # Measured FLOPs and peak memory, cached per stage and shared by the clients of this process.
        self.meter = StepMeter(device)
        # Frozen-prefix caches of the clients this process trains (kept between their rounds).
        self.caches = CacheShelf(cache_dir)
        # fp16's gradient scalers, per client: a client takes a few steps a round, so a scaler started
        # afresh each round would spend them all finding its scale (skipping every step it overflows).
        self.precision = cfg.run.precision
        self.scalers: dict[int, torch.amp.GradScaler] = {}
        # The frozen tensors the clients of this process hold, one copy of each value (see shared).
        self.frozen: dict[str, torch.Tensor] = {}
        # The last message blob decoded, with its tensors (see received).
        self._decoded: tuple[bytes, dict[str, torch.Tensor]] | None = None

    def received(self, blob: bytes, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """The tensors of ``blob`` (as :func:`unpack` gives them), decoded once for every client of this
        process it goes to: an in-process round sends most clients the very same bytes (the server's packer),
        and decoding them again for each of a thousand clients took a fifth of the round. Those equal to a
        frozen copy held are that copy (see shared). The tensors are shared and never written in place; the
        dict is the caller's own."""
        if self._decoded is None or self._decoded[0] is not blob:
            decoded = unpack(blob, dtypes)
            self._decoded = (blob, {key: self._held(key, value) for key, value in decoded.items()})
        return dict(self._decoded[1])

    def _held(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """The frozen copy held for ``key`` if it equals ``value``, else ``value``."""
        held = self.frozen.get(key)
        if held is value or (
            held is not None
            and held.shape == value.shape
            and held.dtype == value.dtype
            and torch.equal(held, value)
        ):
            return held
        return value

    def shared(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` with each one equal to the copy held for another client of this process replaced by
        that copy. Every simulated client holds the same frozen weights, each decoded from its own message:
        kept apart, they grow memory with the population (1,000 emoji clients under frozen: 100 MB each)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            # A new value (a stage froze what it trained) is held from now on: clients holding the old keep
            # theirs.
            out[key] = self.frozen[key] = self._held(key, value)
        return out

    def scaler(self, cid: int) -> torch.amp.GradScaler | None:
        """Client ``cid``'s gradient scaler under fp16, kept between its rounds; None otherwise."""
        if cid not in self.scalers:
            scaler = grad_scaler(self.precision, self.device)
            if scaler is None:
                return None
            self.scalers[cid] = scaler
        return self.scalers[cid]

    def at_depth(self, depth: dict[str, int]) -> MultimodalModel:
        """The skeleton grown to ``depth`` blocks per modality."""
        for modality, d in depth.items():
            self.model.encoders[modality].grow_to(d)
        return self.model


class Client:
    """A client: its own data, the frozen tensors it already holds, and its local training."""

    def __init__(self, cid: int, cfg: Config, data: ClientData, workspace: Workspace):
        self.cid = cid
        self.cfg = cfg
        self.data = data
        self.dataset = data.dataset
        self.workspace = workspace
        self.store: dict[str, torch.Tensor] = {}
        self.last_training: LocalResult | None = None  # the step loop's figures of the last round trained
        # Incomplete data (fedmml.data.missing): which samples hold each modality, drawn from the run's seed;
        # under data.incomplete = "drop" the incomplete ones are left out of training instead.
        self.present = missing.presence(cfg, cid, len(data.dataset))
        self.used = cfg.data.incomplete == "use"
        self.indices = list(range(len(data.dataset)))
        # Modalities none of its samples hold (a unimodal client): their towers are not its to train.
        self.absent = [m for m, mask in (self.present or {}).items() if self.used and not mask.any()]
        if self.present is not None and not self.used:
            complete = np.logical_and.reduce(list(self.present.values()))
            self.indices = [i for i in self.indices if complete[i]]

    @property
    def num_samples(self) -> int:
        """Number of training samples this client holds."""
        return len(self.indices)

    def describe(self) -> dict[str, Any]:
        """What the server learns of this client's data at set-up: sizes and skip counts, no samples; with
        incomplete data, how many samples lack each modality and which modalities it holds."""
        return {
            **self.data.describe(),
            "num_samples": self.num_samples,
            **missing.describe(self.present, self.used),
        }

    def _load(
        self, message: Message, received: dict[str, torch.Tensor] | None = None
    ) -> tuple[Stage, MultimodalModel, set[str], dict[str, torch.Tensor]]:
        """The global model the message describes (its tensors: ``received``, else the message's blob),
        loaded into the workspace: (stage, model, trainable keys, tensors received)."""
        meta = message.meta
        stage = stage_from_meta(meta["stage"])
        model = self.workspace.at_depth(stage.depth)
        trainable = set(without_towers(configure(model, meta["method"], stage), self.absent))
        expected = model.state_dict()
        if received is None:
            # Whatever the wire dtype, the model is loaded with its own (float32) dtypes.
            received = self.workspace.received(message.blob, {k: v.dtype for k, v in expected.items()})
        state = {**{k: v for k, v in self.store.items() if k in expected}, **received}
        if self.absent and not meta.get("evaluate"):
            # The server does not send a training client the towers of modalities it lacks: it never runs
            # them, so they keep whatever values they hold.
            unsent = set(expected) - set(without_towers(list(expected), self.absent))
            state = {**{k: expected[k] for k in unsent if k not in state}, **state}
        missing = sorted(set(expected) - set(state))
        if missing:
            raise PayloadError(f"client {self.cid} lacks {len(missing)} tensors, e.g. {missing[:3]}")
        model.load_state_dict(state, strict=True)
        # Frozen tensors are kept for later rounds; trainable ones change every round and are re-sent.
        self.store = self.workspace.shared({k: v for k, v in state.items() if k not in trainable})
        return stage, model, trainable, received

    def evaluate(self, message: Message) -> Message:
        """Score the global model on this client's own held-out split (eval.where = "federated")."""
        _, model, _, _ = self._load(message)
        transport = message.meta.get("transport", "float32")
        if self.data.test is None:
            reason = self.data.test_missing or f"client {self.cid} holds no test split"
            return Message({"cid": self.cid, "no_test": reason}, pack({}, transport))
        with autocast(self.cfg.run.precision, model.device):
            scores = task_for(self.cfg).local_scores(model, self.data.test, self.cfg)
        return Message({"cid": self.cid, "scores": scores}, pack({}, transport))

    def fit_necks(self, message: Message) -> Message:
        """The sums of the server's least-squares fit of the necks a stage rebuilt (neck_fit.enabled),
        over this client's first training samples as the round's first epoch presents them."""
        received = unpack(message.blob)
        previous = {k: received.pop(k) for k in [k for k in received if k.startswith(neck_fit.PREVIOUS)]}
        _, model, _, _ = self._load(message, received)
        meta = message.meta
        olds = {m: int(d) for m, d in meta["neck_fit"].items()}
        # Only samples that hold every modality whose neck is fitted.
        indices = [i for i in self.indices if self.present is None or all(self.present[m][i] for m in olds)]
        limit = min(self.cfg.model.neck_fit_samples, len(indices))
        epoch = meta["round"] * meta["local_epochs"]
        loader = DataLoader(
            IndexedSamples(self.dataset, indices),
            batch_size=self.cfg.federation.batch_size,
            sampler=[(position, epoch) for position in range(limit)],
            collate_fn=indexed_collate(self.dataset.collate),
        )
        (sums, seen), flops = count_flops(lambda: neck_fit.statistics(model, loader, olds, previous, limit))
        return Message({"cid": self.cid, "neck_fit_samples": seen, "flops": flops}, pack(sums, "float32"))

    def handle(self, message: Message) -> Message:
        """Answer one instruction: train and reply with this client's update, evaluate, or fit necks."""
        if message.meta.get("evaluate"):
            return self.evaluate(message)
        if message.meta.get("neck_fit"):
            return self.fit_necks(message)
        meta = message.meta
        stage, model, trainable, received = self._load(message)
        # Frozen tensors arrive only when this client lacks them: new to the prefix, or replacing lost ones.
        frozen_received = [k for k in received if k not in trainable]
        shelf = self.workspace.caches
        method = meta["method"]
        # Under data.incomplete = "drop" the training samples are complete: no row needs a presence mask.
        present = self.present if self.used else None
        cache = shelf.get(
            self.cid, model, method, stage, self.cfg, self.dataset, self.indices, frozen_received, present
        )
        meter = self.workspace.meter
        local = train_epochs(
            model,
            self.dataset,
            self.indices,
            stage,
            meta,
            self.cfg,
            meter,
            cache,
            self.workspace.scaler(self.cid),
            present,
            self.workspace.processes,
        )
        # Timings stay with the process that ran the client (its engine reports them): in a reply they would
        # make the bytes on the wire differ from run to run.
        self.last_training = local
        current = model.state_dict()
        update = {k: current[k] for k in sorted(trainable)}
        unclipped = None
        if "clip" in meta:
            # Client-level privacy: the change this round made goes out clipped (fedmml.federation.privacy).
            reference = {k: received[k] for k in update}
            # Messages from before privacy.stats_share clipped the whole change as one.
            update, unclipped = clip_update(update, reference, meta["clip"], meta.get("stats_share", 1.0))
        # The reply travels as the server asked; messages from before transport.dtype existed mean float32.
        transport = meta.get("transport", "float32")
        as_delta = lossy(transport)
        if "secure" in meta:
            update = changes(update, received)  # a secure sum adds up changes, of counters too
        elif as_delta:
            # A rounding transport carries this round's change rather than the weights: the rounding error
            # then scales with the (small) change, not with the weights, and the server adds the change to
            # its float32 master weights, which also cancels the rounding of what it sent.
            update = to_delta(update, received)
        cost = meter.finish()  # flops, peak_mem_bytes
        # The one-off fill pass is work of the round that filled the cache.
        fill_flops = cache.take_fill_flops() if cache is not None else 0
        cost["flops"] += fill_flops
        reply = {
            "cid": self.cid,
            "num_samples": self.num_samples,
            "train_loss": local.loss,
            "steps": local.steps,
            "unreadable_images": local.unreadable,
            **cost,
            "cache_bytes": cache.nbytes if cache is not None else 0,
            "cache_fill_flops": fill_flops,
            "cache_on_disk": bool(cache is not None and cache.on_disk),
            "cache_note": shelf.why(self.cid),
        }
        if as_delta:
            reply["delta"] = True
        if unclipped is not None:
            reply["unclipped"] = unclipped
        return Message(reply, pack(update, transport))
