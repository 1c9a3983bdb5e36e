"""Peak memory of one training step, from the tensors PyTorch really allocates and frees.

On CPU PyTorch keeps no allocator statistics, so :class:`LiveTensorTracker` (a ``TorchDispatchMode``) follows
every tensor storage the step creates or touches: it adds a storage's bytes when an op returns it and
subtracts them when the storage is freed (a weakref callback). Parameters, buffers, gradients and optimiser
state that exist before the step are registered up front. The result is the exact peak of live tensor
bytes, with a breakdown by role at that peak. Memory an op uses only inside its kernel (e.g. oneDNN
scratch space) is invisible to it; :func:`rss_sampler` gives the process's peak RSS for a cross-check.

On CUDA the reported peak is ``torch.cuda.max_memory_allocated`` over the step (which also sees kernel
workspaces); the tracker still supplies the breakdown.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# Roles, named after the categories of torch.profiler's memory profiler.
PARAMETER = "parameter"  # weights and buffers of the client model (frozen and trainable)
GRADIENT = "gradient"  # .grad of trainable parameters
OPTIMIZER_STATE = "optimizer_state"  # AdamW moments and step counters
ACTIVATION = "activation"  # created by the forward pass and still alive (mostly saved for backward)
TEMPORARY = "temporary"  # created by the backward pass, other than parameter gradients
INPUT = "input"  # batch tensors and anything else made outside PyTorch ops
CATEGORIES = (PARAMETER, GRADIENT, OPTIMIZER_STATE, ACTIVATION, TEMPORARY, INPUT)

CPU_METHOD = "cpu_dispatch_live_tensors"
CUDA_METHOD = "cuda_max_allocated"


def memory_method(device: torch.device) -> str:
    """Name of the method that produces the peak-memory figure on ``device``."""
    return CUDA_METHOD if device.type == "cuda" else CPU_METHOD


@dataclass
class MemoryPeak:
    """Peak memory of one measured step and what was live at that peak."""

    peak_bytes: int
    method: str
    breakdown: dict[str, int]
    start_bytes: int  # live tensor bytes when the step began
    tracked_peak_bytes: int  # the tracker's own peak (equals peak_bytes on CPU)
    rss_delta_bytes: int | None = None  # peak RSS growth during the step, when sampled

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "peak_bytes": self.peak_bytes,
            "method": self.method,
            "breakdown": dict(self.breakdown),
            "start_bytes": self.start_bytes,
            "tracked_peak_bytes": self.tracked_peak_bytes,
            "rss_delta_bytes": self.rss_delta_bytes,
        }


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, meta, ...
        return None


@dataclass
class _Live:
    nbytes: int
    category: str


class LiveTensorTracker(TorchDispatchMode):
    """Live tensor bytes per role while active; ``peak`` and ``at_peak`` hold the high-water mark."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        inputs: Iterable[Any] = (),
        absent: Iterable[nn.Module] = (),
    ) -> None:
        super().__init__()
        self.model = model
        # Tensors of modules the step never runs (a cached frozen prefix) are not part of the working set.
        self.absent = {id(t) for m in absent for t in m.state_dict(keep_vars=True).values()}
        self.optimizer = optimizer
        self.inputs = list(inputs)
        self.live: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.at_peak: dict[str, int] = dict(self.live)
        self.start = 0
        self._info: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: list[weakref.ref] = []
        self._in_optimizer = False
        self._handles: list[Any] = []

    # Bookkeeping -------------------------------------------------------------------------------------
    def _track(self, t: Any, category: str) -> None:
        if not isinstance(t, torch.Tensor):
            return
        st = _storage(t)
        if st is None or st in self._info:
            return
        info = _Live(st.nbytes(), category)
        self._info[st] = info
        self._refs.append(weakref.ref(st, lambda _, info=info: self._free(info)))
        self.live[category] += info.nbytes
        self.total += info.nbytes
        if self.total > self.peak:
            self.peak = self.total
            self.at_peak = dict(self.live)

    def _free(self, info: _Live) -> None:
        self.live[info.category] -= info.nbytes
        self.total -= info.nbytes

    def _relabel(self, t: torch.Tensor | None, category: str) -> None:
        st = _storage(t) if t is not None else None
        if st is None:
            return
        info = self._info.get(st)
        if info is None:
            self._track(t, category)
        elif info.category != category:
            self.live[info.category] -= info.nbytes
            self.live[category] += info.nbytes
            info.category = category

    def _optimizer_tensors(self) -> Iterator[torch.Tensor]:
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))

    # Mode --------------------------------------------------------------------------------------------
    def __enter__(self) -> LiveTensorTracker:
        for tensor in self.model.state_dict(keep_vars=True).values():
            if id(tensor) not in self.absent:
                self._track(tensor, PARAMETER)
        for param in self.model.parameters():
            self._track(param.grad, GRADIENT)
            if param.requires_grad:
                # A gradient is born as an ordinary backward output; it becomes a gradient once stored.
                self._handles.append(
                    param.register_post_accumulate_grad_hook(lambda p: self._relabel(p.grad, GRADIENT))
                )
        for tensor in self._optimizer_tensors():
            self._track(tensor, OPTIMIZER_STATE)
        for tensor in self.inputs:
            self._track(tensor, INPUT)
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._enter_optimizer))
            self._handles.append(self.optimizer.register_step_post_hook(self._leave_optimizer))
        self.start = self.total
        self.peak = self.total
        self.at_peak = dict(self.live)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter_optimizer(self, *_: object) -> None:
        self._in_optimizer = True

    def _leave_optimizer(self, *_: object) -> None:
        self._in_optimizer = False
        for tensor in self._optimizer_tensors():
            self._relabel(tensor, OPTIMIZER_STATE)

    def _phase_category(self) -> str:
        if self._in_optimizer:
            return OPTIMIZER_STATE
        # The autograd engine runs backward functions inside a graph task.
        return TEMPORARY if torch._C._current_graph_task_id() != -1 else ACTIVATION

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Tensors made outside PyTorch ops (token ids from the tokenizer, constants) show up as inputs.
        for t in tree_leaves((args, kwargs)):
            self._track(t, INPUT)
        category = self._phase_category()
        for t in tree_leaves(out):
            self._track(t, category)
        return out


# RSS cross-check -----------------------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(m.group(1)) * 1024 for k in ("VmRSS", "VmHWM") if (m := re.search(rf"{k}:\s+(\d+)", text))}


@contextmanager
def rss_sampler() -> Iterator[dict[str, int | None]]:
    """Peak RSS growth of this process inside the block (Linux: resets VmHWM via clear_refs), else None.

    Meaningful only in a process whose allocator returns freed memory at once (run with
    ``MALLOC_MMAP_THRESHOLD_`` set low); see the bench's isolated cross-check.
    """
    result: dict[str, int | None] = {"delta": None}
    supported = sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()
    if supported:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
        except OSError:
            supported = False
    before = _proc_status().get("VmRSS", 0) if supported else 0
    yield result
    if supported:
        result["delta"] = _proc_status().get("VmHWM", 0) - before


# Measurement ---------------------------------------------------------------------------------------------


@dataclass
class _Measurement:
    tracker: LiveTensorTracker
    device: torch.device
    rss: dict[str, int | None] = field(default_factory=dict)
    result: MemoryPeak | None = None


@contextmanager
def measure_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    inputs: Iterable[Any] = (),
    rss: bool = False,
    absent: Iterable[nn.Module] = (),
) -> Iterator[_Measurement]:
    """Track the peak memory of the code in the block; ``.result`` holds a :class:`MemoryPeak` afterwards."""
    device = next(model.parameters()).device
    tracker = LiveTensorTracker(model, optimizer, inputs, absent)
    m = _Measurement(tracker, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    sampler = rss_sampler() if rss else None
    with sampler if sampler is not None else _none() as rss_result, tracker:
        yield m
        if cuda:
            torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else tracker.peak
    m.result = MemoryPeak(
        peak_bytes=int(peak),
        method=memory_method(device),
        breakdown=dict(tracker.at_peak),
        start_bytes=tracker.start,
        tracked_peak_bytes=tracker.peak,
        rss_delta_bytes=rss_result.get("delta") if rss_result else None,
    )


@contextmanager
def _none() -> Iterator[dict[str, int | None]]:
    yield {}
