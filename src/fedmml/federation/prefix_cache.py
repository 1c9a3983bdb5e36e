"""Frozen-prefix cache for LW-FedMML: a client runs its frozen stem and blocks once per stage, not every step.

In stage s > 1 of ``lw`` the stem and the blocks of earlier stages are frozen and in eval mode, and a client's
data never changes, so their output for a given input is the same in every local step of every round of the
stage. :class:`PrefixCache` computes it once, when the client is first trained in the stage, for every input
the client's samples can present (every caption of an image, so random caption sampling still works), and
training then runs only the new blocks, the norm, the neck and the heads on the stored hidden states. With
deterministic preprocessing this is exact: the steps see the same batches, the same dropout draws and the same
inputs to the trainable part as without the cache. With random augmentation the cache holds a fixed number of
views per image, those of epochs 0..views-1, and epoch e uses view e mod views (exact for the first views).

At the next stage the blocks trained in this one are frozen too. A client that holds a cache then *extends*
it: it runs only the newly frozen blocks over the stored rows, never the stem and older blocks again. A full
fill is needed only for a client's first cache, or when frozen tensors of the cached prefix itself arrive (a
node that lost its state).

Rows are stored in memory or appended to one file per modality (``store="disk"``), in float32 (exact) or
float16. A cache that would grow past its bound is abandoned and the client trains the ordinary way.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmml.accounting.flops import FlopsByKey
from fedmml.methods import Stage, configure, set_train_mode
from fedmml.models.multimodal import MultimodalModel, present_rows, take_rows

DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Rows are grouped into chunks of this many inputs for the fill pass (the prefix runs in eval mode, so the
# chunk size changes nothing but speed and peak memory).
FILL_CHUNK = 64


class CacheTooLarge(RuntimeError):
    """The cache would exceed its size bound."""


def cache_starts(model: MultimodalModel, method: str, stage: Stage) -> dict[str, int] | None:
    """Blocks per modality whose output is cached in ``stage`` (after the frozen stem), or None: no cache.

    ``lw`` freezes a prefix from its second stage on (the stems train in the first); ``frozen`` freezes every
    block from the start.
    """
    if method == "frozen":
        return dict(stage.depth)
    if method != "lw" or stage.index == 0:
        return None
    return {m: (new[0] if (new := stage.new_blocks[m]) else stage.depth[m]) for m in model.encoders}


class RowStore:
    """Tensors appended once and read back by position: in the memory of ``device`` (host RAM for the CPU),
    or in one flat file read with a memmap."""

    def __init__(self, dtype: torch.dtype, folder: Path | None, device: torch.device | None = None) -> None:
        self.dtype = dtype
        self.device = device or torch.device("cpu")
        self.rows: list[torch.Tensor] = []
        self.index: list[tuple[int, tuple[int, ...]]] = []  # disk: (element offset, shape) per row
        self.nbytes = 0
        self.path = None if folder is None else folder / "rows.bin"
        self._file = None if self.path is None else self.path.open("wb")
        self._elements = 0
        self._map: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.rows) if self.path is None else len(self.index)

    def append(self, row: torch.Tensor) -> int:
        """Store ``row``; return its position."""
        row = row.detach().to("cpu" if self._file else self.device, self.dtype).contiguous()
        self.nbytes += row.numel() * row.element_size()
        if self._file is None:
            # A copy, so the row does not keep the whole fill batch alive through a view.
            self.rows.append(row.clone())
            return len(self.rows) - 1
        self._file.write(row.numpy().tobytes())
        self.index.append((self._elements, tuple(row.shape)))
        self._elements += row.numel()
        return len(self.index) - 1

    def seal(self) -> None:
        """Finish writing; rows become readable."""
        if self._file is not None:
            self._file.close()
            self._file = None
            if self._elements:
                np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
                self._map = np.memmap(self.path, dtype=np_dtype, mode="r", shape=(self._elements,))

    def shape(self, position: int) -> tuple[int, ...]:
        """Shape of the row at ``position``."""
        return tuple(self.rows[position].shape) if self.path is None else self.index[position][1]

    def get(self, position: int) -> torch.Tensor:
        """The row at ``position``, as a float32 tensor."""
        if self.path is None:
            return self.rows[position].float()
        offset, shape = self.index[position]
        count = int(np.prod(shape))
        return torch.from_numpy(np.array(self._map[offset : offset + count])).view(shape).float()


@dataclass
class CacheKey:
    """What a cache was computed for: the stage and the cached depth per modality."""

    stage: int
    starts: tuple[tuple[str, int], ...]


class PrefixCache:
    """One client's cached prefix outputs for one stage, per modality, keyed by (sample index, input)."""

    def __init__(
        self,
        key: CacheKey,
        store: str,
        dtype: str,
        max_bytes: int,
        folder: Path | None,
        flops: FlopsByKey | None = None,
        device: torch.device | None = None,
    ) -> None:
        """``store``: memory (host RAM), device (the memory of ``device``) or disk (files in ``folder``)."""
        self.key = key
        self.starts = dict(key.starts)
        self.max_bytes = max_bytes
        self.flops = flops or FlopsByKey()
        # For the cache that extends this one.
        self._settings = (store, dtype, max_bytes, folder, self.flops, device)
        self._dir = Path(tempfile.mkdtemp(prefix="prefix-", dir=folder)) if store == "disk" else None
        self.stores: dict[str, RowStore] = {}
        for m in self.starts:
            sub = None
            if self._dir is not None:
                sub = self._dir / m
                sub.mkdir()
            self.stores[m] = RowStore(DTYPES[dtype], sub, device if store == "device" else None)
        # modality -> (sample index, variant) -> row position; variant: the string itself, or a view number.
        self.positions: dict[str, dict[tuple[int, Hashable], int]] = {m: {} for m in self.starts}
        self.views: dict[str, dict[int, int]] = {m: {} for m in self.starts}  # tensor views per sample
        self.fill_flops = 0
        self._fill_reported = False

    def take_fill_flops(self) -> int:
        """FLOPs of the fill pass the first time they are asked for, then 0 (they are paid once)."""
        if self._fill_reported:
            return 0
        self._fill_reported = True
        return self.fill_flops

    @property
    def nbytes(self) -> int:
        """Bytes of stored hidden states, all modalities."""
        return sum(s.nbytes for s in self.stores.values())

    @property
    def on_disk(self) -> bool:
        """Whether the rows live in files rather than in memory."""
        return self._dir is not None

    def close(self) -> None:
        """Release the rows (and delete the files of a disk store)."""
        self.stores.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def fill(
        self,
        model: MultimodalModel,
        dataset: Dataset,
        indices: list[int],
        views: int = 1,
        present: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Run the frozen prefix (eval mode, no gradients) over every input of the client's samples (with
        ``present``, of those that hold the input's modality)."""
        try:
            with torch.no_grad(), _bounded_by_device():
                self._fill(model, dataset, indices, views, present)
        except CacheTooLarge:
            self.close()
            raise
        for store in self.stores.values():
            store.seal()

    def _fill(
        self,
        model: MultimodalModel,
        dataset: Dataset,
        indices: list[int],
        views: int,
        present: dict[str, np.ndarray] | None,
    ) -> None:
        for m, start in self.starts.items():
            encoder = model.encoders[m]
            held = indices if present is None else [i for i in indices if present[m][i]]
            for keys, raws in _chunks(dataset, held, m, views, self.views[m]):
                inputs = model.inputs(m, _stack(raws))
                shapes = tuple(tuple(v.shape) for v in inputs.values())
                key = ("prefix", m, start, shapes)
                (hidden, context), flops = self.flops.run(key, encoder.forward_prefix, inputs, start)
                self.fill_flops += flops
                for key, row in zip(keys, encoder.unbatch(hidden, context), strict=True):
                    self.positions[m][key] = self.stores[m].append(row)
                self._check_size()

    def _check_size(self) -> None:
        if self.nbytes > self.max_bytes:
            bound = self.max_bytes / 2**20
            raise CacheTooLarge(f"the frozen-prefix cache passed its bound of {bound:.0f} MiB")

    def can_extend_to(self, key: CacheKey, touched: dict[str, int]) -> bool:
        """Whether this cache can become ``key``'s by running more blocks: a later stage, no shallower
        prefix, and no received frozen tensor inside the cached prefix (``touched``: first block per
        modality among the frozen tensors that arrived; -1 is the stem)."""
        starts = dict(key.starts)
        return (
            key.stage > self.key.stage
            and starts.keys() == self.starts.keys()
            and all(min(starts[m], touched.get(m, starts[m])) >= self.starts[m] for m in starts)
        )

    def extended(self, model: MultimodalModel, key: CacheKey) -> PrefixCache:
        """The cache of ``key``'s deeper prefix, computed from these rows by the blocks frozen since."""
        deeper = PrefixCache(key, *self._settings)
        try:
            with torch.no_grad(), _bounded_by_device():
                deeper._extend_from(self, model)
        except CacheTooLarge:
            deeper.close()
            raise
        for store in deeper.stores.values():
            store.seal()
        return deeper

    def _extend_from(self, old: PrefixCache, model: MultimodalModel) -> None:
        for m, start in self.starts.items():
            encoder = model.encoders[m]
            blocks = list(encoder.blocks)[old.starts[m] : start]
            store = old.stores[m]
            # Rows keep their positions, so the (sample, variant) -> position maps carry over.
            for first in range(0, len(store), FILL_CHUNK):
                chunk = range(first, min(first + FILL_CHUNK, len(store)))
                rows = [store.get(p).to(model.device) for p in chunk]
                hidden, context = encoder.rebatch(rows)
                key = ("blocks", m, old.starts[m], start, tuple(hidden.shape))
                hidden, flops = self.flops.run(key, _run_blocks, encoder, blocks, hidden, context)
                self.fill_flops += flops
                for row in encoder.unbatch(hidden, context):
                    self.stores[m].append(row)
                self._check_size()
            self.positions[m] = dict(old.positions[m])
            self.views[m] = dict(old.views[m])

    def _positions(self, modality: str, batch: dict[str, Any], epoch: int) -> list[int]:
        """Stored rows of the batch's samples that hold ``modality``."""
        positions = self.positions[modality]
        views = self.views[modality]
        rows = present_rows(batch, modality)
        out = []
        indices, raws = take_rows(batch["index"], rows), take_rows(batch[modality], rows)
        for i, raw in zip(indices, raws, strict=True):
            # A caption is found by its text; a tensor input by the view this epoch uses.
            out.append(positions[(i, raw if isinstance(raw, str) else epoch % views[i])])
        return out

    def batch_shapes(self, batch: dict[str, Any], epoch: int) -> tuple[tuple[int, ...], ...]:
        """Shape of each modality's batched hidden state for ``batch`` (what fixes a cached step's FLOPs)."""
        shapes = []
        for m in self.starts:
            rows = [self.stores[m].shape(p) for p in self._positions(m, batch, epoch)]
            shapes.append((len(rows), *np.max(np.array(rows), axis=0).tolist()) if rows else (0,))
        return tuple(shapes)

    def features(self, model: MultimodalModel, batch: dict[str, Any], epoch: int) -> dict[str, torch.Tensor]:
        """Encoder outputs for ``batch`` in ``epoch``: cached hidden states through the trainable rest."""
        features = {}
        for m, start in self.starts.items():
            encoder = model.encoders[m]
            # Non-blocking: from host RAM each row is staged at once, without waiting for the device.
            positions = self._positions(m, batch, epoch)
            rows = [self.stores[m].get(p).to(model.device, non_blocking=True) for p in positions]
            if not rows:
                continue  # no sample of the batch holds this modality
            hidden, context = encoder.rebatch(rows)
            features[m] = encoder.forward_suffix(hidden, context, start)
        return features


@contextmanager
def _bounded_by_device() -> Iterator[None]:
    """A cache kept on a GPU that runs out of its memory is too large, as one past ``cache.max_mib``."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise CacheTooLarge(
            'the frozen-prefix cache does not fit in the device\'s memory (cache.store = "memory" keeps it '
            "in host RAM)"
        ) from err


def _run_blocks(encoder: Any, blocks: list[torch.nn.Module], hidden: torch.Tensor, context: Any) -> Any:
    for block in blocks:
        hidden = encoder.run_block(block, hidden, context)
    return hidden


def _stack(raws: list[Any]) -> Any:
    return torch.stack(raws) if isinstance(raws[0], torch.Tensor) else list(raws)


def _chunks(
    dataset: Dataset, indices: list[int], modality: str, views: int, counts: dict[int, int]
) -> Iterator[tuple[list, list]]:
    """(keys, raw inputs) in chunks of FILL_CHUNK over every input of ``modality``; records view counts."""
    keys: list[tuple[int, Hashable]] = []
    raws: list[Any] = []
    for i in indices:
        variants = dataset.variants(i, views)[modality]
        counts[i] = len(variants)
        for view, raw in enumerate(variants):
            keys.append((i, raw if isinstance(raw, str) else view))
            raws.append(raw)
            if len(raws) == FILL_CHUNK:
                yield keys, raws
                keys, raws = [], []
    if raws:
        yield keys, raws


class CacheShelf:
    """The caches of the clients one process trains, by client id (one per client, for its current stage)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.caches: dict[int, PrefixCache] = {}
        self.flops = FlopsByKey()  # fill and extension costs by shape, shared by every cache here
        # Caches the clients held when a checkpoint was written: rebuilt on their next round after a resume.
        # Their work is a cost of resuming, not of a round: it is not in any reply's FLOPs.
        self.lost: dict[int, CacheKey] = {}
        self.refused: dict[int, tuple[CacheKey, str]] = {}  # cid -> (stage it was refused in, why)

    def get(
        self,
        cid: int,
        model: MultimodalModel,
        method: str,
        stage: Stage,
        cfg: Any,
        dataset: Dataset,
        indices: list[int],
        frozen_received: list[str],
        present: dict[str, np.ndarray] | None = None,
    ) -> PrefixCache | None:
        """The client's cache for ``stage``: kept, extended from an earlier stage's, or filled now.

        ``frozen_received``: keys of the frozen tensors that arrived with this round's message; ``present``:
        which samples hold each modality (incomplete data), the only ones cached. None: no cache
        this time (not ``lw`` past its first stage, cache off, or refused; see :meth:`why`).
        """
        starts = cache_starts(model, method, stage) if cfg.cache.frozen_prefix else None
        key = None if starts is None else CacheKey(stage.index, tuple(sorted(starts.items())))
        touched = _first_blocks(frozen_received)
        if key is not None:
            # The prefix runs in eval mode with this stage's frozen set, whichever way the cache is made.
            configure(model, method, stage)
            set_train_mode(model, method, stage)

        def fill(cache: PrefixCache) -> None:
            cache.fill(model, dataset, indices, cfg.cache.views, present)

        lost = self.lost.pop(cid, None)
        if lost is not None and cid not in self.caches and key is not None:
            self._rebuild(cid, lost, cfg, fill, model.device)
        old = self.caches.pop(cid, None)
        if key is None:
            if old is not None:
                old.close()
            return None
        if old is not None and old.key == key and not touched:
            self.caches[cid] = old
            return old
        refused = self.refused.get(cid)
        if refused is not None and refused[0] == key and not touched:
            return None
        self.refused.pop(cid, None)
        try:
            if old is not None and old.can_extend_to(key, touched):
                cache = old.extended(model, key)
            else:
                cache = self._new(key, cfg, model.device)
                fill(cache)
        except CacheTooLarge as err:
            self.refused[cid] = (key, str(err))
            return None
        finally:
            if old is not None:
                old.close()
        self.caches[cid] = cache
        return cache

    def _rebuild(
        self, cid: int, key: CacheKey, cfg: Any, fill: Callable[[PrefixCache], None], device: torch.device
    ) -> None:
        """Refill a cache lost with its process, as it was: its prefix has been frozen since, so the blocks
        the model holds now are the ones it was computed with."""
        cache = self._new(key, cfg, device)
        try:
            fill(cache)
        except CacheTooLarge:
            return  # it fitted before; if it no longer does, the next request finds out and says why
        cache.take_fill_flops()  # spent here: the round that reuses the cache must not report it
        self.caches[cid] = cache

    def state(self) -> dict[str, Any]:
        """Which cache each client holds, as JSON-able data (for checkpoints)."""
        return {str(cid): [c.key.stage, [list(s) for s in c.key.starts]] for cid, c in self.caches.items()}

    def restore(self, state: dict[str, Any]) -> None:
        """Remember the caches of a checkpoint, to be rebuilt when each client next trains."""
        self.lost = {
            int(c): CacheKey(stage, tuple((m, d) for m, d in starts)) for c, (stage, starts) in state.items()
        }

    def _new(self, key: CacheKey, cfg: Any, device: torch.device) -> PrefixCache:
        folder = None
        if cfg.cache.store == "disk":
            folder = self.folder or Path(tempfile.gettempdir())
            folder.mkdir(parents=True, exist_ok=True)
        max_bytes = int(cfg.cache.max_mib * 2**20)
        return PrefixCache(key, cfg.cache.store, cfg.cache.dtype, max_bytes, folder, self.flops, device)

    def why(self, cid: int) -> str:
        """Why the client's last request got no cache ('' if it got one or none was due)."""
        refused = self.refused.get(cid)
        return refused[1] if refused is not None else ""

    def close(self) -> None:
        """Drop every cache."""
        for cache in self.caches.values():
            cache.close()
        self.caches.clear()


def _first_blocks(keys: list[str]) -> dict[str, int]:
    """Per modality, the first block among state-dict keys ``encoders.<m>.blocks.<j>.*`` (-1: a stem key)."""
    first: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] != "encoders" or len(parts) < 3:
            continue
        if parts[2] == "stem":
            index = -1
        elif parts[2] == "blocks":
            index = int(parts[3])
        else:
            continue  # a norm or neck: rebuilt with the width, not part of any prefix
        first[parts[1]] = min(first.get(parts[1], index), index)
    return first
