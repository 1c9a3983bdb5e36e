"""FLOPs of real training steps, counted by PyTorch's ``FlopCounterMode`` on the ops that actually run.

Counted: matrix multiplications, convolutions and attention (forward and backward), 2 FLOPs per
multiply-accumulate. Not counted: element-wise ops, norms, softmax, embedding lookups and the optimiser step
(all memory-bound and a few percent of the total for these models).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

T = TypeVar("T")

aten = torch.ops.aten


def _cpu_sdpa_flop(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flop(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _conv_backward_flop(
    grad_out: Any,
    x: Any,
    w: Any,
    bias: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    transposed: bool,
    output_padding: Any,
    groups: int,
    output_mask: list[bool],
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    # Every multiply-accumulate of the forward convolution occurs once in grad_input and once in
    # grad_weight. PyTorch's own formula ignores ``groups`` for grad_weight and so overcounts a depthwise
    # convolution (EfficientNet) by its channel count.
    forward = conv_flop_count(x, w, grad_out, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


# PyTorch's registry covers the CUDA attention kernels only; on CPU, scaled_dot_product_attention runs these
# two ops, which would otherwise count as zero. They take the same leading arguments as the CUDA kernels and
# get the same formulas (FlopCounterMode passes shapes, not tensors).
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}
CUSTOM_FLOPS = {**CPU_ATTENTION_FLOPS, aten.convolution_backward: _conv_backward_flop}


@contextmanager
def eager() -> Iterator[None]:
    """Modules compiled by ``run.compile`` run as written: what the accounting measures is the model's own
    arithmetic and memory, whether or not a run compiles it (a counter also sees no op inside a compiled
    kernel)."""
    if "torch._dynamo" not in sys.modules:  # nothing is compiled; importing the compiler costs seconds
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


@contextmanager
def flop_counter() -> Iterator[FlopCounterMode]:
    """A silent ``FlopCounterMode`` that also counts CPU attention and grouped-convolution backward right,
    over the eager ops (see :func:`eager`)."""
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    with eager(), counter:
        yield counter


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` once and return its result and the FLOPs it executed."""
    with flop_counter() as counter:
        result = fn()
    return result, int(counter.get_total_flops())


class FlopsByKey:
    """FLOPs of computations whose cost a key fixes (e.g. the input shapes): counted the first time a key is
    seen, then reused, because the counter's dispatch overhead can exceed the computation itself."""

    def __init__(self) -> None:
        self.known: dict[Hashable, int] = {}

    def run(self, key: Hashable, fn: Callable[..., T], *args: Any) -> tuple[T, int]:
        """Run ``fn(*args)``; return its result and its FLOPs (counted now, or known from an earlier run)."""
        if key in self.known:
            return fn(*args), self.known[key]
        result, flops = count_flops(lambda: fn(*args))
        self.known[key] = flops
        return result, flops
