"""Where one client's local training spends its time, for any version of fedmml (it wraps the version's own
functions from outside, so today's code and an older checkout are measured alike).

    PYTHONPATH=src python benchmarks/profile_step.py --data /data/coco --method e2e --precision bf16

One client of a paper-coco run (random initialisation) trains two rounds of ``--steps`` batches through
``Client.handle``; round 1 warms up (start-up, the accounting's measured steps), round 2 is measured: its
samples/s, the host time spent in each part of a step (loading, tokenising, the encoders' forward, heads
and loss, backward, optimizer step, ``loss.item()``), and under ``torch.profiler`` the device's kernel time
and the ops that cost most. On a GPU the host times are the time to issue the work, unless something in a
part makes the host wait for the device. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from contextlib import contextmanager
from typing import Any

import torch

from fedmml.client_data import open_client_data, source_of
from fedmml.config import load_config
from fedmml.device import select_device
from fedmml.federation import client as client_module
from fedmml.federation.server import Server
from fedmml.methods import plan_stages
from fedmml.models import multimodal
from fedmml.models.backends import hf_bert
from fedmml.models.build import build_model

PARTS: dict[str, float] = collections.defaultdict(float)


def _timed(owner: Any, name: str, part: str) -> None:
    """Wrap ``owner.name`` so that its host time adds to ``PARTS[part]``."""
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            PARTS[part] += time.perf_counter() - started

    setattr(owner, name, wrapper)


def _instrument() -> None:
    _timed(multimodal.MultimodalModel, "features", "forward: encoders")
    _timed(multimodal.DualEncoder, "loss_from_features", "forward: heads and loss")
    _timed(torch.Tensor, "backward", "backward")
    _timed(torch.optim.AdamW, "step", "optimizer step")
    _timed(torch.Tensor, "item", "loss.item()")
    _timed(hf_bert.HFBertEncoder, "tokenize", "tokenize")
    _timed(torch.utils.data.dataloader._BaseDataLoaderIter, "__next__", "loader")


def _device_us(event: Any) -> float:
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


@contextmanager
def _profiled(enabled: bool) -> Any:
    if not enabled:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a COCO captions folder")
    parser.add_argument("--method", default="e2e")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    args = parser.parse_args()
    batch = 32
    cfg = load_config(
        "paper-coco",
        [
            f'data.root="{args.data}"',
            f'run.method="{args.method}"',
            f'run.precision="{args.precision}"',
            f"data.workers={args.workers}",
            'model.image.pretrained=""',
            'model.text.pretrained=""',
            "federation.local_epochs=1",
            "federation.num_clients=1",
            f"data.limit_train={args.steps * batch}",
            *args.set,
        ],
    )
    _instrument()
    device = select_device(cfg.run.device)
    client = client_module.Client(
        0, cfg, open_client_data(cfg, 0, source_of(cfg)), client_module.Workspace(cfg, device)
    )
    model = build_model(cfg.model, load_weights=False).to(device)
    totals = {m: e.total_blocks for m, e in model.encoders.items()}
    stages = plan_stages(cfg.active_schedule, args.method, totals)
    server = Server(cfg, model, stages)
    for stage in stages:
        trainable = server.enter_stage(stage)
    for round_no in (1, 2):
        PARTS.clear()
        message, _ = server.message_for(0, stages[-1], round_no, trainable, measure_memory=round_no == 1)
        with _profiled(round_no == 2) as prof:
            started = time.perf_counter()
            reply = client.handle(message)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - started
    steps = reply.meta["steps"]
    events = prof.key_averages()
    kernels_ms = sum(_device_us(e) for e in events) / 1e3 / steps
    top = sorted(events, key=_device_us, reverse=True)[:10]
    result = {
        "method": args.method,
        "precision": args.precision,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": steps,
        "handle_s": round(wall, 3),
        "samples_per_s": round(steps * batch / wall, 1),
        "host_ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in sorted(PARTS.items())},
        "device_kernel_ms_per_step": round(kernels_ms, 3),
        "device_busy_share": round(kernels_ms * steps / 1e3 / wall, 3),
        "top_device_ops_ms_per_step": {
            e.key: round(_device_us(e) / 1e3 / steps, 3) for e in top if _device_us(e)
        },
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
