"""Per-client cost of local training, measured on the real training steps.

Measuring is expensive, so a :class:`StepMeter` (one per process, shared by the clients it runs) measures
FLOPs once per (stage, batch shape) and peak memory only when asked:

- FLOPs: the first step with a new (stage, input shapes) key runs under ``FlopCounterMode``; every later
  step with that key adds the cached count. The caller supplies the key (e.g. pixel and padded token
  shapes). A client's ``flops`` is the sum over the steps it ran.
- Memory: when the server asks a client to measure (one client per stage, see ``Server``), that client's
  first two steps run under the live-tensor tracker and its ``peak_mem_bytes`` is the larger of the two (the
  second step is the steady state: gradients and optimiser state from the first are live); other clients
  report 0. The server keeps the stage's figure, so it does not depend on which process ran which client.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from fedmml.accounting.flops import eager, flop_counter
from fedmml.accounting.memory import MemoryPeak, measure_memory, memory_method
from fedmml.methods import Stage

MEMORY_STEPS = 2  # steps measured for memory in each stage


def stage_key(method: str, stage: Stage) -> tuple[Hashable, ...]:
    """What identifies a stage in the caches: method, index and depth."""
    return method, stage.index, tuple(sorted(stage.depth.items()))


class StepMeter:
    """Counts FLOPs and peak memory of local training steps, with the per-stage caches described above."""

    def __init__(self, device: torch.device, rss: bool = False) -> None:
        self.memory_method = memory_method(device)
        self.rss = rss  # also sample peak RSS around memory-measured steps (isolated cross-checks only)
        self.step_flops: dict[tuple[Hashable, ...], int] = {}
        self.memory: dict[Hashable, MemoryPeak] = {}
        self._memory_steps: dict[Hashable, int] = {}
        self._stage: Hashable = None
        self._measuring = False
        self.flops = 0
        self.peak_mem_bytes = 0

    def start(self, method: str, stage: Stage, measure_memory: bool = True) -> None:
        """Begin one client's local training in ``stage`` of ``method``; measure its peak memory if asked."""
        self._stage = stage = stage_key(method, stage)
        self.flops = 0
        self.peak_mem_bytes = 0
        self._measuring = measure_memory
        self._memory_steps[stage] = MEMORY_STEPS if measure_memory else 0
        if measure_memory:
            self.memory.pop(stage, None)

    def finish(self) -> dict[str, int]:
        """This client's cost: FLOPs summed over its steps, its peak memory (0 when not measured)."""
        peak = self.memory.get(self._stage) if self._measuring else None
        self.peak_mem_bytes = peak.peak_bytes if peak is not None else 0
        return {"flops": self.flops, "peak_mem_bytes": self.peak_mem_bytes}

    @contextmanager
    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        shapes: Hashable,
        inputs: Sequence[torch.Tensor] = (),
        absent: Sequence[nn.Module] = (),
    ) -> Iterator[None]:
        """Wrap one training step (forward, backward, optimiser step) whose FLOPs ``shapes`` determine.

        ``absent``: modules the step never runs, whose weights a client need not hold (a cached prefix).
        """
        key = (self._stage, shapes)
        count_flops = key not in self.step_flops
        measure_mem = self._memory_steps.get(self._stage, 0) > 0
        with ExitStack() as stack:
            counter = stack.enter_context(flop_counter()) if count_flops else None
            mem = None
            if measure_mem:
                stack.enter_context(eager())
                mem = stack.enter_context(measure_memory(model, optimizer, inputs, self.rss, absent))
            yield
        if counter is not None:
            self.step_flops[key] = int(counter.get_total_flops())
        self.flops += self.step_flops[key]
        if mem is not None and mem.result is not None:
            self._memory_steps[self._stage] -= 1
            best = self.memory.get(self._stage)
            if best is None or mem.result.peak_bytes > best.peak_bytes:
                self.memory[self._stage] = mem.result

    def stage_summary(self, method: str, stage: Stage) -> dict[str, Any]:
        """FLOPs per step by batch shape and the memory measurement of ``stage``."""
        key = stage_key(method, stage)
        flops = {k[1]: v for k, v in self.step_flops.items() if k[0] == key}
        peak = self.memory.get(key)
        return {"step_flops": flops, "memory": peak.to_dict() if peak is not None else None}
