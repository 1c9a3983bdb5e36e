"""``run.precision``: training and evaluation under autocast, with float32 weights everywhere else.

Autocast runs matrix products and convolutions in bfloat16 or float16 and keeps reductions, norms and the
loss in float32; parameters, optimizer state, checkpoints and every tensor that travels stay float32, so a
run's payloads and resumability do not depend on its precision. float16's narrow range needs a gradient
scaler; bfloat16 does not. How FLOPs and memory are counted under autocast: docs/resources.md.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The forward passes' context: autocast to ``precision`` on ``device``, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (small gradients would flush to zero without it); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
