"""Measured client cost: FLOPs and peak memory of real training steps (bytes come from the payloads)."""

from fedmml.accounting.flops import count_flops, flop_counter
from fedmml.accounting.memory import MemoryPeak, measure_memory, memory_method
from fedmml.accounting.meter import StepMeter

__all__ = ["MemoryPeak", "StepMeter", "count_flops", "flop_counter", "measure_memory", "memory_method"]
