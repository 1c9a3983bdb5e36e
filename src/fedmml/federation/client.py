"""One client's side of a round: merge what the server sent, train locally, return the trainable tensors.

Engine-agnostic: the in-process engine calls :meth:`Client.handle` directly; a Flower ClientApp can call the
same method with the message it received, keeping :attr:`Client.store` in the node's state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fedmml.accounting import StepMeter, count_flops
from fedmml.client_data import ClientData
from fedmml.config import Config
from fedmml.data import missing
from fedmml.federation import neck_fit
from fedmml.federation.payload import Message, PayloadError, lossy, pack, to_delta, unpack
from fedmml.federation.prefix_cache import CacheShelf, PrefixCache
from fedmml.methods import Stage, configure, frozen_modules, param_group, set_train_mode, without_towers
from fedmml.models.build import build_model
from fedmml.models.multimodal import PRESENT, MultimodalModel, one_sided_rows, present_rows, take_rows
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

    def __init__(self, cfg: Config, device: torch.device, cache_dir: Path | None = None) -> None:
        self.device = device
        lora = cfg.run.method == "lora"
        self.model: MultimodalModel = build_model(
            cfg.model, load_weights=False, adapters=lora, missing=missing.incomplete(cfg)
        ).to(device)
        # Measured FLOPs and peak memory, cached per stage and shared by the clients of this process.
        self.meter = StepMeter(device)
        # Frozen-prefix caches of the clients this process trains (kept between their rounds).
        self.caches = CacheShelf(cache_dir)
        # fp16's gradient scalers, per client: a client takes a few steps a round, so a scaler started
        # afresh each round would spend them all finding its scale (skipping every step it overflows).
        self.precision = cfg.run.precision
        self.scalers: dict[int, torch.amp.GradScaler] = {}

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


def make_optimizer(model: torch.nn.Module, stage: Stage, cfg: Config, method: str) -> torch.optim.AdamW:
    """A fresh AdamW (as the paper) with one group per modality encoder and one for the heads; under prog
    (``method``: what the server asked this client to train), the stems and blocks of earlier stages form
    their encoder's second group, at ``federation.prog_earlier_lr_scale`` times the stage's rate."""
    fed = cfg.federation
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            earlier = method == "prog" and stage.index > 0 and _from_earlier_stage(name, stage)
            groups.setdefault((param_group(name), earlier), []).append(param)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": stage.lr[group] * (fed.prog_earlier_lr_scale if earlier else 1.0),
                "weight_decay": fed.head_weight_decay if group == "heads" else fed.weight_decay,
            }
            for (group, earlier), params in groups.items()
        ],
        # The fused kernel is ~6x faster than the default on CPU for models of this size.
        fused=True,
    )


def _from_earlier_stage(name: str, stage: Stage) -> bool:
    """Whether parameter ``name`` is an encoder stem or a block appended before ``stage``."""
    parts = name.split(".")
    if parts[0] != "encoders" or len(parts) < 4:
        return False
    return parts[2] == "stem" or (parts[2] == "blocks" and int(parts[3]) not in stage.new_blocks[parts[1]])


class EpochSampler(Sampler[tuple[int, int]]):
    """A shuffled order of ``n`` positions per epoch (the permutations of a RandomSampler on the same
    generator), each position paired with the epoch: worker processes then draw a sample's caption and crop
    from (seed, epoch, index) without being told the epoch, so batches are the same for any worker count."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        # A shuffling DataLoader draws its workers' base seed from this generator before each epoch's
        # permutation; drawn here too, every epoch, so runs keep the batches of runs made before this sampler
        # (and persistent workers, which draw no new base seed, change nothing).
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return ((p, epoch) for p in torch.randperm(self.n, generator=self.generator).tolist())


class IndexedSamples(Dataset):
    """A client's training samples by (position, epoch), each with its index in the dataset (how the
    frozen-prefix cache finds its rows) and the count of unreadable images passed over for it."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any, int]:
        position, epoch = key
        index = self.indices[position]
        sample, missed = self.dataset.take(index, epoch)
        return index, sample, missed


def indexed_collate(collate: Callable[[list[Any]], dict[str, Any]]) -> Callable[[list[Any]], dict[str, Any]]:
    """The dataset's collate, plus the batch's dataset indices under ``"index"`` and the unreadable images
    passed over under ``"unreadable"``."""

    def fn(items: list[tuple[int, Any, int]]) -> dict[str, Any]:
        indices, samples, missed = zip(*items, strict=True)
        return {**collate(list(samples)), "index": list(indices), "unreadable": sum(missed)}

    return fn


def loader_workers(cfg: Config, device: torch.device) -> int:
    """``data.workers``, or when -1 a choice from the machine: on a GPU, workers keep its input coming
    (up to 8, leaving a core to the training loop); on the CPU they would take cores from training itself,
    measured a loss on small machines (benchmarks/RESULTS.md, "COCO-scale data"), so none below 8 cores."""
    if cfg.data.workers >= 0:
        return cfg.data.workers
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores < 8 else min(4, cores // 4)


def batch_presence(present: dict[str, np.ndarray], indices: list[int]) -> dict[str, torch.Tensor]:
    """Which rows of a batch (its dataset ``indices``) hold each modality. A modality only one row holds
    counts as absent from that row too: a projection head's BatchNorm cannot take a batch of one."""
    masks = {m: torch.from_numpy(mask[indices]) for m, mask in present.items()}
    return {m: mask if int(mask.sum()) != 1 else torch.zeros_like(mask) for m, mask in masks.items()}


def _input_shape(encoder: Any, raw: Any, rows: torch.Tensor | None) -> tuple[int, ...]:
    """The shape of ``encoder``'s first input tensor for ``rows`` of a batch's raw inputs ((0,): no row)."""
    if rows is not None and not len(rows):
        return (0,)
    return tuple(next(iter(encoder.prepare(take_rows(raw, rows)).values())).shape)


def one_sided_shapes(model: MultimodalModel, batch: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """Per modality, the input shape of the rows that hold it alone (what a unimodal term runs again)."""
    modalities = list(model.encoders)
    return tuple(
        _input_shape(enc, batch[m], one_sided_rows(batch, m, modalities)) for m, enc in model.encoders.items()
    )


def input_shapes(model: MultimodalModel, batch: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """The shapes that fix a full step's FLOPs: each modality's first input tensor (e.g. padded token ids),
    over the rows that hold the modality."""
    return tuple(_input_shape(enc, batch[m], present_rows(batch, m)) for m, enc in model.encoders.items())


def train_epochs(
    model: MultimodalModel,
    dataset: Dataset,
    indices: list[int],
    stage: Stage,
    meta: dict[str, Any],
    cfg: Config,
    meter: StepMeter | None = None,
    cache: PrefixCache | None = None,
    scaler: torch.amp.GradScaler | None = None,
    present: dict[str, np.ndarray] | None = None,
) -> tuple[float, int, int]:
    """Local training of the configured model; returns (mean loss over steps, steps, unreadable images
    passed over).

    With a ``cache`` the frozen prefix is read from it instead of being run: same batches, same result.
    Forward passes run under ``run.precision``'s autocast; fp16 steps go through ``scaler``. ``present``:
    per modality, which dataset indices hold it (incomplete data; each batch then says which rows do).
    """
    method = meta["method"]
    seed = meta["seed"]
    batch = cfg.federation.batch_size
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and drop-connect draws
    sampler = EpochSampler(len(indices), generator)
    device = model.device
    workers = loader_workers(cfg, device)
    loader = DataLoader(
        IndexedSamples(dataset, indices),
        batch_size=batch,
        sampler=sampler,
        # Its own generator for the workers' base seeds: the global RNG (dropout) is left as it was.
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(indices) >= batch,
        collate_fn=indexed_collate(dataset.collate),
        num_workers=workers,
        persistent_workers=workers > 0,  # one start per round, not per local epoch
        pin_memory=device.type == "cuda",
    )
    # Gradients left on parameters that are frozen now (trained in an earlier stage) would otherwise stay
    # allocated for the rest of the run.
    model.zero_grad(set_to_none=True)
    optimizer = make_optimizer(model, stage, cfg, method)
    precision = cfg.run.precision
    set_train_mode(model, method, stage)
    # A cached client never runs its frozen modules, so their weights are not part of its working memory;
    # with incomplete data it may (an image-text unimodal term's second view runs the whole encoder).
    reruns = present is not None and model.reruns_encoders
    absent = frozen_modules(model, method, stage) if cache is not None and not reruns else []
    if meter is not None:
        meter.start(method, stage, measure_memory=bool(meta.get("measure_memory")))
    losses = []
    unreadable = 0
    for local_epoch in range(meta["local_epochs"]):
        epoch = meta["round"] * meta["local_epochs"] + local_epoch
        sampler.epoch = epoch
        for data in loader:
            unreadable += data["unreadable"]
            if len(data["index"]) < 2:  # a contrastive batch needs negatives; BatchNorm needs two samples
                continue
            if present is not None:
                data[PRESENT] = batch_presence(present, data["index"])
            if meter is None:
                step = nullcontext()
            else:
                cached = cache is not None
                key = ("cached", cache.batch_shapes(data, epoch)) if cached else input_shapes(model, data)
                if present is not None:  # which rows pair up, and the inputs of one-sided rows' second views
                    key = (len(data["index"]), key, one_sided_shapes(model, data))
                inputs = [v for v in data.values() if isinstance(v, torch.Tensor)]
                step = meter.step(model, optimizer, key, inputs, absent)
            with step:
                with autocast(precision, device):
                    features = model.features(data) if cache is None else cache.features(model, data, epoch)
                    loss = model.loss_from_features(features, data)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
            losses.append(loss.item())
    return (float(np.mean(losses)) if losses else float("nan")), len(losses), unreadable


class Client:
    """A client: its own data, the frozen tensors it already holds, and its local training."""

    def __init__(self, cid: int, cfg: Config, data: ClientData, workspace: Workspace):
        self.cid = cid
        self.cfg = cfg
        self.data = data
        self.dataset = data.dataset
        self.workspace = workspace
        self.store: dict[str, torch.Tensor] = {}
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
            received = unpack(message.blob, {k: v.dtype for k, v in expected.items()})
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
        self.store = {k: v for k, v in state.items() if k not in trainable}
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
        loss, steps, unreadable = train_epochs(
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
        )
        current = model.state_dict()
        update = {k: current[k] for k in sorted(trainable)}
        # The reply travels as the server asked; messages from before transport.dtype existed mean float32.
        transport = meta.get("transport", "float32")
        as_delta = lossy(transport)
        if as_delta:
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
            "train_loss": loss,
            "steps": steps,
            "unreadable_images": unreadable,
            **cost,
            "cache_bytes": cache.nbytes if cache is not None else 0,
            "cache_fill_flops": fill_flops,
            "cache_on_disk": bool(cache is not None and cache.on_disk),
            "cache_note": shelf.why(self.cid),
        }
        if as_delta:
            reply["delta"] = True
        return Message(reply, pack(update, transport))
