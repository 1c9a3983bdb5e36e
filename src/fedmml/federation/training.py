"""How a client's local training runs on its device: its batches in, its trained model and the loop's
figures out.

The loop is written for a GPU without costing the CPU anything: nothing in a step waits for the device (the
step losses stay on it and are read once per local epoch), batches come from pinned memory with
non-blocking copies, text is tokenised once per batch, AdamW is fused, and a client whose frozen-prefix
cache covers every modality reads no pixels at all. ``run.compile`` compiles the encoders' stems and blocks
and the heads with ``torch.compile``; the steps that the accounting measures (FLOPs, peak memory) run
eagerly, so the figures do not depend on it. ``torch.profiler`` sees each step's phases as ``fedmml.*``
ranges (``fedmml bench speed --profile``).

:class:`fedmml.federation.client.Client` keeps what a client is (its data, its cache, its reply); this
module keeps how its arithmetic runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset, Sampler

from fedmml.accounting import StepMeter
from fedmml.config import Config
from fedmml.federation.prefix_cache import PrefixCache
from fedmml.methods import Stage, frozen_modules, param_group, set_train_mode
from fedmml.models.multimodal import PRESENT, MultimodalModel, one_sided_rows, take_rows
from fedmml.precision import autocast


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
        # One kernel over all parameters (CPU and CUDA), ~6x faster than the default on CPU for models of this
        # size; its step counters live on the device, so a step never waits for it.
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
    frozen-prefix cache finds its rows) and the count of unreadable images passed over for it. ``skip``:
    modalities whose inputs the loop never reads (a cache holds their rows), not decoded."""

    def __init__(self, dataset: Dataset, indices: list[int], skip: Collection[str] = ()) -> None:
        self.dataset = dataset
        self.indices = indices
        self.skip = frozenset(skip)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any, int]:
        position, epoch = key
        index = self.indices[position]
        sample, missed = self.dataset.take(index, epoch, self.skip)
        return index, sample, missed


def indexed_collate(collate: Callable[[list[Any]], dict[str, Any]]) -> Callable[[list[Any]], dict[str, Any]]:
    """The dataset's collate, plus the batch's dataset indices under ``"index"`` and the unreadable images
    passed over under ``"unreadable"``."""

    def fn(items: list[tuple[int, Any, int]]) -> dict[str, Any]:
        indices, samples, missed = zip(*items, strict=True)
        return {**collate(list(samples)), "index": list(indices), "unreadable": sum(missed)}

    return fn


def loader_workers(cfg: Config, device: torch.device, processes: int = 1) -> int:
    """``data.workers``, or when -1 a choice from the machine: on a GPU, workers keep its input coming (up to
    8 per training process, leaving a core to each of the ``processes`` training loops that share the
    machine); on the CPU they would take cores from training itself, measured a loss on small machines
    (benchmarks/RESULTS.md, "COCO-scale data"), so none below 8 cores."""
    if cfg.data.workers >= 0:
        return cfg.data.workers
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, (cores - processes) // processes))
    return 0 if cores < 8 else min(4, cores // 4)


def batch_presence(present: dict[str, np.ndarray], indices: list[int]) -> dict[str, torch.Tensor]:
    """Which rows of a batch (its dataset ``indices``) hold each modality. A modality only one row holds
    counts as absent from that row too: a projection head's BatchNorm cannot take a batch of one."""
    masks = {m: torch.from_numpy(mask[indices]) for m, mask in present.items()}
    return {m: mask if int(mask.sum()) != 1 else torch.zeros_like(mask) for m, mask in masks.items()}


def _first_shape(inputs: dict[str, torch.Tensor]) -> tuple[int, ...]:
    return tuple(next(iter(inputs.values())).shape)


def one_sided_shapes(model: MultimodalModel, batch: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """Per modality, the input shape of the rows that hold it alone (what a unimodal term runs again)."""
    modalities = list(model.encoders)
    shapes = []
    for m, encoder in model.encoders.items():
        rows = one_sided_rows(batch, m, modalities)
        shapes.append(_first_shape(encoder.prepare(take_rows(batch[m], rows))) if len(rows) else (0,))
    return tuple(shapes)


def input_shapes(model: MultimodalModel, prepared: dict[str, dict[str, torch.Tensor]]) -> tuple:
    """The shapes that fix a full step's FLOPs: each modality's first input tensor (e.g. padded token ids)
    over the rows that hold the modality (``prepared``: :meth:`MultimodalModel.prepare`'s inputs)."""
    return tuple(_first_shape(prepared[m]) if m in prepared else (0,) for m in model.encoders)


def compile_model(model: MultimodalModel) -> None:
    """``torch.compile`` every encoder's stem and blocks (those not yet grown too) and the heads, in place:
    state-dict keys stay as they are, and the glue between them (growth, caches, incomplete rows) stays
    Python. Blocks of one architecture share their compiled code."""
    modules: list[nn.Module] = []
    for encoder in model.encoders.values():
        modules += [encoder.stem, *encoder.block_pool]
    modules += [child for name, child in model.named_children() if name != "encoders"]
    for module in modules:
        module.compile()


@dataclass
class LocalResult:
    """What one client's local training did: the mean step loss, the steps taken, the unreadable images
    passed over, the step loop's wall time (from asking for the first batch until the last step's result is
    on the host) with the part of it spent waiting for batches, and when (``time.time()``) the host had
    issued its first step."""

    loss: float
    steps: int
    unreadable: int
    train_s: float
    data_wait_s: float
    first_step_at: float | None = None


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
    processes: int = 1,
) -> LocalResult:
    """Local training of the configured model on the samples ``indices`` of ``dataset``.

    With a ``cache`` the frozen prefix is read from it instead of being run: same batches, same result.
    Forward passes run under ``run.precision``'s autocast; fp16 steps go through ``scaler``. ``present``:
    per modality, which dataset indices hold it (incomplete data; each batch then says which rows do).
    ``processes``: training processes sharing this machine (their loaders share its cores).
    """
    method = meta["method"]
    seed = meta["seed"]
    batch = cfg.federation.batch_size
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and drop-connect draws
    sampler = EpochSampler(len(indices), generator)
    device = model.device
    workers = loader_workers(cfg, device, processes)
    # With complete data, a cache that covers every modality leaves the loader only captions and labels to
    # read; with incomplete data a one-sided row's second view may run its whole encoder on the raw input.
    skip = list(cache.starts) if cache is not None and present is None else []
    loader = DataLoader(
        IndexedSamples(dataset, indices, skip),
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
    set_train_mode(model, method, stage)
    # A cached client never runs its frozen modules, so their weights are not part of its working memory;
    # with incomplete data it may (an image-text unimodal term's second view runs the whole encoder).
    reruns = present is not None and model.reruns_encoders
    absent = frozen_modules(model, method, stage) if cache is not None and not reruns else []
    if meter is not None:
        meter.start(method, stage, measure_memory=bool(meta.get("measure_memory")))
    steps = _Steps(model, optimizer, meter, cache, scaler, present, absent, cfg.run.precision)
    losses: list[float] = []
    unreadable = 0
    waited = 0.0
    first_step_at = None
    started = time.perf_counter()
    for local_epoch in range(meta["local_epochs"]):
        epoch = meta["round"] * meta["local_epochs"] + local_epoch
        sampler.epoch = epoch
        # The epoch's step losses, still on the device: read together once the epoch is done.
        pending: list[torch.Tensor] = []
        batches = iter(loader)
        while True:
            asked = time.perf_counter()
            with record_function("fedmml.load"):
                data = next(batches, None)
            waited += time.perf_counter() - asked
            if data is None:
                break
            unreadable += data["unreadable"]
            if len(data["index"]) < 2:  # a contrastive batch needs negatives; BatchNorm needs two samples
                continue
            loss = _step(steps, data, epoch)
            pending.append(loss.detach())
            first_step_at = first_step_at or time.time()
        if pending:
            # One wait for the device per epoch; the host mean is taken in float64 over the float32 losses.
            losses += torch.stack(pending).float().cpu().tolist()
    train_s = time.perf_counter() - started
    mean = float(np.mean(losses)) if losses else float("nan")
    return LocalResult(mean, len(losses), unreadable, train_s, waited, first_step_at)


@dataclass
class _Steps:
    """What every step of one client's local training shares: the model and its optimizer, the accounting,
    the frozen-prefix cache, the fp16 scaler, which samples hold each modality, the modules a cached step
    never runs, and the precision."""

    model: MultimodalModel
    optimizer: torch.optim.Optimizer
    meter: StepMeter | None
    cache: PrefixCache | None
    scaler: torch.amp.GradScaler | None
    present: dict[str, np.ndarray] | None
    absent: list[nn.Module]
    precision: str


def _step(steps: _Steps, data: dict[str, Any], epoch: int) -> torch.Tensor:
    """One optimizer step on the batch ``data``; returns its loss (on the device)."""
    model, optimizer, cache, scaler = steps.model, steps.optimizer, steps.cache, steps.scaler
    if steps.present is not None:
        data[PRESENT] = batch_presence(steps.present, data["index"])
    with record_function("fedmml.prepare"):
        # Tokenised and copied to the device once; the accounting reads its shapes from the same inputs.
        prepared = model.prepare(data) if cache is None else None
    with record_function("fedmml.meter"):
        step = _metered(steps, data, epoch, prepared)
    with step:
        with record_function("fedmml.forward"), autocast(steps.precision, model.device):
            features = model.features(data, prepared) if cache is None else cache.features(model, data, epoch)
            loss = model.loss_from_features(features, data)
        optimizer.zero_grad(set_to_none=True)
        with record_function("fedmml.backward"):
            (loss if scaler is None else scaler.scale(loss)).backward()
        with record_function("fedmml.optimizer"):
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
    return loss


def _metered(
    steps: _Steps, data: dict[str, Any], epoch: int, prepared: dict[str, dict[str, torch.Tensor]] | None
) -> AbstractContextManager:
    """The accounting's context for one step: the key that fixes its FLOPs (its input shapes) and what its
    memory measurement must know; nothing without a meter."""
    model, cache = steps.model, steps.cache
    if steps.meter is None:
        return nullcontext()
    key = ("cached", cache.batch_shapes(data, epoch)) if cache is not None else input_shapes(model, prepared)
    if steps.present is not None:  # which rows pair up, and the inputs of one-sided rows' second views
        key = (len(data["index"]), key, one_sided_shapes(model, data))
    inputs = [v for v in data.values() if isinstance(v, torch.Tensor)]
    return steps.meter.step(model, steps.optimizer, key, inputs, steps.absent)
