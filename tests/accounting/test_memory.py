"""Peak live-tensor memory of real training steps: exact breakdown, agreement with PyTorch's profiler."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fedmml.accounting import measure_memory
from fedmml.accounting.memory import CPU_METHOD


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 64))


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = model(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_steady_state_breakdown_is_exact() -> None:
    model = _mlp()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, fused=True)
    x = torch.randn(128, 256)
    _step(model, opt, x)  # creates gradients and optimiser state
    with measure_memory(model, opt, [x]) as m:
        _step(model, opt, x)
    peak = m.result
    assert peak.method == CPU_METHOD
    b = peak.breakdown
    assert b["parameter"] == _nbytes(model.parameters())
    assert b["gradient"] == _nbytes(trainable)
    # AdamW: two moments per parameter plus a 4-byte step counter per tensor
    assert b["optimizer_state"] == 2 * _nbytes(trainable) + 4 * len(trainable)
    # saved for backward: the outputs of both hidden Linear layers and of both ReLUs (ReLU saves its output,
    # Linear its input, so each 128 x 512 tensor is kept once), plus the 128 x 64 output for the square
    assert b["activation"] >= 3 * 128 * 512 * 4
    assert peak.peak_bytes == sum(b.values()) == peak.tracked_peak_bytes


def test_peak_agrees_with_the_profiler_memory_timeline() -> None:
    profiler = pytest.importorskip("torch.profiler._memory_profiler")
    x = torch.randn(128, 256)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    with measure_memory(model, opt, [x]) as m:
        _step(model, opt, x)

    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(
        activities=activities, profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        _step(model, opt, x)
    _, sizes = profiler.MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    assert m.result.peak_bytes == pytest.approx(max(sum(s) for s in sizes), rel=1e-4)


def test_frozen_layers_keep_no_gradients_state_or_activations() -> None:
    x = torch.randn(128, 256)
    results = {}
    for frozen in (False, True):
        model = _mlp()
        if frozen:
            model[:4].requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, fused=True)
        _step(model, opt, x)
        with measure_memory(model, opt, [x]) as m:
            _step(model, opt, x)
        results[frozen] = m.result.breakdown
    assert results[True]["parameter"] == results[False]["parameter"]
    assert results[True]["gradient"] == 64 * 512 * 4 + 64 * 4  # the last layer only
    # At the forward peak the trainable model holds the first ReLU's output (saved) and the second layer's
    # output and ReLU; with the first layers frozen the first ReLU's output is not saved and is freed.
    hidden = 128 * 512 * 4
    assert results[False]["activation"] == 3 * hidden
    assert results[True]["activation"] == 2 * hidden


SAMPLED = """
import torch
from fedmml.accounting.memory import rss_sampler
with rss_sampler() as rss:
    big = torch.ones(64 * 2**20 // 4)
    del big
print(rss["delta"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS via /proc is Linux only")
def test_rss_sampler_sees_a_large_allocation() -> None:
    # In a fresh process whose allocator returns what is freed, as the sampler needs (its docstring): in a
    # test worker that had run other tests first, the peak once did not move (delta 0), the 64 MiB served
    # from memory the process already held.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", SAMPLED], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 60 * 2**20
