"""``fedmml bench resources``: measured per-client cost of e2e, lw and prog on a preset's exact architecture.

For every method and every stage with rounds, the real server builds the real messages
(:meth:`Server.message_for`) and one real client trains a few steps on synthetic inputs of the preset's shapes
(:meth:`Client.handle`), so every figure comes from the code path of a run:

- bytes: safetensors payloads in the configured ``transport.dtype`` (:func:`fedmml.federation.payload.pack`);
  down in the first round of a stage = trainable tensors + the frozen ones the client lacks, down in later
  rounds = trainable only;
- FLOPs and peak memory: the client's :class:`fedmml.accounting.StepMeter`, as in every run.

Totals assume the client takes part in every round; a stage with 0 rounds costs nothing. Weights are random
(``load_weights=False``); an encoder whose weights come from a hub id is built from its ``arch`` table
instead, because the hub cannot be reached offline (the layer shapes are the same, so the cost is too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedmml.accounting import StepMeter
from fedmml.client_data import ClientData
from fedmml.config import BENCH_METHODS, Config, config_from_dict
from fedmml.data.advance import collate as collate_pairs
from fedmml.data.audio import FeatureSettings, feature_settings
from fedmml.data.coco import collate_train
from fedmml.data.missing import incomplete
from fedmml.device import select_device
from fedmml.federation.budgets import slice_method, slices_of
from fedmml.federation.client import Client, Workspace
from fedmml.federation.payload import upload_parts
from fedmml.federation.server import Server
from fedmml.methods import plan_stages
from fedmml.models.build import build_model
from fedmml.models.multimodal import MultimodalModel
from fedmml.tasks import resolve_classes

# Bench variants of a method: (method, config overrides). Plain names run with the preset's own settings.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"lw-nocache": ("lw", {"cache": {"frozen_prefix": False}})}
PAPER_RATIOS = {"memory": 2.7, "flops": 2.4, "comm": 2.3}  # LW-FedMML vs FedMML, "up to" [paper abstract]

Progress = Callable[[str], None]


class _Fixed(Dataset):
    """Synthetic samples: the same every epoch, none unreadable."""

    def take(self, i: int, epoch: int, skip: Collection[str] = ()) -> tuple[Any, int]:
        """What the training loop reads (see CaptionDataset.take; in memory, nothing to skip)."""
        return self[i], 0


class SyntheticCaptions(_Fixed):
    """Random pixels at the encoder's image size and captions of random tokens that fill ``max_length``.

    Each image has ``captions_per_image`` captions (COCO: 5); training uses the first, and a frozen-prefix
    cache stores them all, as it would for real data.
    """

    def __init__(
        self,
        n: int,
        image_size: int,
        tokenizer: Any,
        max_length: int,
        seed: int = 0,
        captions_per_image: int = 5,
        augment: bool = False,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.per_image = captions_per_image
        self.augment = augment  # as the preset's data: a cache then stores several views per image
        # The range of normalised images ((x - 0.5) / 0.5), as CaptionDataset produces.
        self.pixels = torch.rand(n, 3, image_size, image_size, generator=g) * 2 - 1
        # Word pieces from the upper part of the vocabulary (no special tokens); twice as many as needed, so
        # the re-tokenised caption is always cut at max_length.
        low = tokenizer.vocab_size // 16
        ids = torch.randint(low, tokenizer.vocab_size, (n * captions_per_image, 2 * max_length), generator=g)
        self.captions = tokenizer.batch_decode(ids.tolist())

    collate = staticmethod(collate_train)

    def variants(self, i: int, views: int = 1) -> dict[str, list[Any]]:
        """Every caption of sample ``i``, and its image once per view that augmentation would cache."""
        start = i * self.per_image
        images = [self.pixels[i]] * (views if self.augment else 1)
        return {"image": images, "text": self.captions[start : start + self.per_image]}

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.pixels[i], self.captions[i * self.per_image]


class SyntheticPairs(_Fixed):
    """Random pixels and full-length filterbanks with random labels, shaped as the preset's image + audio."""

    def __init__(
        self,
        n: int,
        image_size: int,
        features: FeatureSettings,
        num_classes: int,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.rand(n, 3, image_size, image_size, generator=g) * 2 - 1
        self.fbanks = torch.randn(n, features.max_frames, features.num_mel_bins, generator=g)
        self.labels = torch.randint(num_classes, (n,), generator=g).tolist()
        self.augment = augment  # as the preset's data: a cache then stores several views per image

    collate = staticmethod(collate_pairs)

    def variants(self, i: int, views: int = 1) -> dict[str, list[torch.Tensor]]:
        """The filterbank of sample ``i``, and its image once per view that augmentation would cache."""
        return {"image": [self.pixels[i]] * (views if self.augment else 1), "audio": [self.fbanks[i]]}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.pixels[i], self.fbanks[i], self.labels[i]


def synthetic_data(cfg: Config, model: MultimodalModel, n: int) -> Dataset:
    """``n`` synthetic training samples shaped as ``cfg``'s task needs them."""
    size, seed, augment = cfg.model.image.image_size, cfg.run.seed, cfg.data.augment
    if cfg.model.task == "image-audio":
        features = feature_settings(cfg.data.audio_features, cfg.data.audio_frames)
        return SyntheticPairs(n, size, features, cfg.model.num_classes, seed, augment)
    text = model.encoders["text"]
    return SyntheticCaptions(n, size, text.tokenizer, text.max_length, seed, augment=augment)


def bench_config(cfg: Config, name: str) -> tuple[Config, list[str]]:
    """``cfg`` for one bench method: one client, one local epoch, no hub downloads; plus notes on changes."""
    tree = cfg.to_dict()
    method, overrides = VARIANTS.get(name, (name, {}))
    for section, values in overrides.items():
        tree[section].update(values)
    tree["run"]["method"] = method
    tree["federation"].update(num_clients=1, clients_per_round=0, local_epochs=1, client_memory_mib=0.0)
    notes = []
    for modality in cfg.model.modalities:
        enc = tree["model"][modality]
        source = enc["pretrained"]
        if source not in ("", "package") and not Path(source).exists():
            enc["pretrained"] = ""
            notes.append(
                f"{modality} encoder built from model.{modality}.arch, not from {source!r} "
                "(hub not reachable)"
            )
    # A classifier's width comes from the data when the preset leaves it open; synthetic pairs need only a
    # count, so a given model.num_classes stands without class folders.
    if tree["model"]["num_classes"] and not tree["data"]["classes"]:
        tree["data"]["classes"] = [f"class{i}" for i in range(tree["model"]["num_classes"])]
    return resolve_classes(config_from_dict(tree)), notes


def bench_method(
    cfg: Config,
    method: str,
    steps: int = 2,
    only_stage: int | None = None,
    rss: bool = False,
    progress: Progress | None = None,
    stages_of: str = "",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-stage measured cost of ``method`` (or a variant): (rows, info). ``only_stage``: that stage only;
    ``stages_of``: the method whose stages to run instead of ``method``'s own (a slice of a growing run)."""
    say = progress or (lambda msg: None)
    name = method
    bcfg, notes = bench_config(cfg, name)
    method = bcfg.run.method
    device = select_device(bcfg.run.device)
    torch.manual_seed(bcfg.run.seed)
    lora, missing = method == "lora", incomplete(bcfg)
    model = build_model(bcfg.model, load_weights=False, adapters=lora, missing=missing).to(device)
    totals = {m: enc.total_blocks for m, enc in model.encoders.items()}
    stages = plan_stages(bcfg.active_schedule, stages_of or method, totals)
    workspace = Workspace(bcfg, device)
    if rss:
        workspace.meter = StepMeter(device, rss=True)
    batch = bcfg.federation.batch_size
    data = synthetic_data(bcfg, workspace.model, batch * steps)
    client = Client(0, bcfg, ClientData(data, "synthetic", {}), workspace)
    server = Server(bcfg, model, stages)
    rows = []
    round_no = 0
    for stage in stages:
        trainable = server.enter_stage(stage)
        row: dict[str, Any] = {
            "method": name,
            "stage": stage.index + 1,
            "rounds": stage.rounds,
            "depth": dict(stage.depth),
            "trainable_params": sum(p.numel() for p in server.model.parameters() if p.requires_grad),
        }
        skip = stage.rounds == 0 if only_stage is None else stage.index != only_stage
        if skip:
            rows.append({**row, "measured": False})
            continue
        say(f"{name}: stage {stage.index + 1}/{len(stages)}")
        round_no += 1
        first, frozen_sent = server.message_for(client.cid, stage, round_no, trainable, measure_memory=True)
        reply = client.handle(first)
        # As after a real round: the client holds what it was sent; aggregation changes every trainable tensor
        # (its version is bumped).
        server.ledger.record(client.cid, frozen_sent)
        server.ledger.bump(trainable)
        later, _ = server.message_for(client.cid, stage, round_no + 1, trainable)
        round_no += max(stage.rounds - 1, 0)
        measured = workspace.meter.stage_summary(method, stage)
        state = server.model.state_dict()
        fill_flops = reply.meta.get("cache_fill_flops", 0)
        step_flops = (reply.meta["flops"] - fill_flops) / max(reply.meta["steps"], 1)
        rows.append(
            {
                **row,
                "measured": True,
                "bytes_down_first": len(first.blob),
                "bytes_down_later": len(later.blob),
                "bytes_up": len(reply.blob),
                "upload_parts": upload_parts(state, trainable, bcfg.transport.dtype),
                "peak_mem_bytes": reply.meta["peak_mem_bytes"],
                "memory": measured["memory"],
                "flops_per_step": int(step_flops),
                "flops_per_sample": step_flops / batch,
                # The frozen-prefix cache: filled once per stage; its size grows with the client's data.
                "fill_flops_per_sample": fill_flops / len(data),
                "cache_bytes_per_sample": reply.meta.get("cache_bytes", 0) / len(data),
                "steps": reply.meta["steps"],
            }
        )
    info = {"memory_method": workspace.meter.memory_method, "notes": notes, "device": str(device)}
    return rows, info


def slice_peaks(cfg: Config, steps: int = 2, progress: Progress | None = None) -> dict[int, dict[str, int]]:
    """Per stage with rounds, the measured client peak memory (bytes) of each slice a client of
    ``cfg.run.method`` may train (fedmml.federation.budgets), from the real client on synthetic batches."""
    method = cfg.run.method
    peaks: dict[int, dict[str, int]] = {}
    for name in slices_of(cfg):
        growth = method if method == "hetero" else ""
        # The caller's torch RNG stream (its model's initialisation, its clients' draws) stays as it was.
        with torch.random.fork_rng(devices=[]):
            rows, _ = bench_method(cfg, slice_method(name), steps, progress=progress, stages_of=growth)
        for row in rows:
            if row["measured"]:
                peaks.setdefault(row["stage"] - 1, {})[name] = row["peak_mem_bytes"]
    return peaks


def method_totals(rows: list[dict[str, Any]], local_epochs: int) -> dict[str, Any]:
    """Per-client totals over the schedule: peak memory, FLOPs per local sample, bytes each way."""
    active = [r for r in rows if r["rounds"] > 0 and r.get("measured")]
    up = sum(r["rounds"] * r["bytes_up"] for r in active)
    down = sum(r["bytes_down_first"] + (r["rounds"] - 1) * r["bytes_down_later"] for r in active)
    return {
        "rounds": sum(r["rounds"] for r in active),
        "peak_mem_bytes": max((r["peak_mem_bytes"] for r in active), default=0),
        # FLOPs one local training sample costs over the whole schedule (rounds x local epochs).
        "flops_per_sample": sum(
            r["rounds"] * local_epochs * r["flops_per_sample"] + r["fill_flops_per_sample"] for r in active
        ),
        "cache_bytes_per_sample": max((r["cache_bytes_per_sample"] for r in active), default=0),
        "bytes_up": up,
        "bytes_down": down,
        "bytes_total": up + down,
    }


def ratios(totals: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """e2e's figure divided by each other method's: memory (peak), FLOPs and communication (totals)."""
    keys = {"memory": "peak_mem_bytes", "flops": "flops_per_sample", "comm": "bytes_total"}
    base = totals.get("e2e")
    if base is None:
        return {}
    return {
        name: {m: base[key] / t[key] for m, t in totals.items() if m != "e2e" and t[key]}
        for name, key in keys.items()
    }


def rss_cross_check(cfg: Config, method: str, stage_index: int, steps: int = 2) -> dict[str, Any]:
    """Run one stage's client steps in a fresh process and compare tracked growth with peak-RSS growth."""
    # A fixed, low mmap threshold makes glibc return every freed tensor to the OS at once, so RSS follows
    # the live bytes instead of the allocator's free lists.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        payload = {"config": cfg.to_dict(), "method": method, "stage": stage_index, "steps": steps}
        request.write_text(json.dumps(payload))
        subprocess.run(
            [sys.executable, "-m", "fedmml.bench", str(request), str(answer)],
            env=env,
            check=True,
            capture_output=True,
        )
        return json.loads(answer.read_text())


def _rss_child(request: Path, answer: Path) -> None:
    spec = json.loads(request.read_text())
    cfg = config_from_dict(spec["config"])
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    rows, _ = bench_method(cfg, spec["method"], spec["steps"], only_stage=spec["stage"], rss=True)
    row = next(r for r in rows if r["measured"])
    mem = row["memory"]
    answer.write_text(
        json.dumps(
            {
                "method": spec["method"],
                "stage": row["stage"],
                "tracked_peak_bytes": mem["tracked_peak_bytes"],
                "tracked_growth_bytes": mem["tracked_peak_bytes"] - mem["start_bytes"],
                "rss_growth_bytes": mem["rss_delta_bytes"],
            }
        )
    )


def run_bench(
    cfg: Config,
    methods: tuple[str, ...] = BENCH_METHODS,
    steps: int = 2,
    rss_check: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure every method on ``cfg``'s preset and schedule; return the JSON-able result."""
    start = time.perf_counter()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    per_stage: list[dict[str, Any]] = []
    totals: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {}
    for method in methods:
        rows, info = bench_method(cfg, method, steps, progress=progress)
        per_stage += rows
        totals[method] = method_totals(rows, cfg.federation.local_epochs)
    checks = []
    if rss_check:
        for method in methods:
            active = [r for r in per_stage if r["method"] == method and r.get("measured")]
            peak = max(active, key=lambda r: r["peak_mem_bytes"])
            if progress:
                progress(f"{method}: RSS cross-check of stage {peak['stage']} in a fresh process")
            checks.append(rss_cross_check(cfg, method, peak["stage"] - 1, steps))
    return {
        "preset": cfg.preset,
        "schedule": cfg.schedule,
        "memory_method": info.get("memory_method"),
        "device": info.get("device"),
        "threads": torch.get_num_threads(),
        "batch_size": cfg.federation.batch_size,
        "local_epochs": cfg.federation.local_epochs,
        "transport": cfg.transport.dtype,
        "steps_per_stage": steps,
        "notes": info.get("notes", []),
        "per_stage": per_stage,
        "totals": totals,
        "ratios": ratios(totals),
        "paper_ratios": PAPER_RATIOS,
        "rss_check": checks,
        "wall_s": time.perf_counter() - start,
    }


# Markdown --------------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    # One decimal for large values, more for small ones (tiny presets).
    if abs(v) >= 10 or v == 0:
        return f"{v:,.1f}"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"


def _mib(n: float) -> str:
    return _num(n / 2**20)


def _mb(n: float) -> str:
    return _num(n / 1e6)


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def render_markdown(result: dict[str, Any]) -> str:
    """The bench result as Markdown tables (per stage, totals, ratios beside the paper's, LW upload, RSS)."""
    out = [
        f"### Client cost: preset `{result['preset']}`, schedule `{result['schedule']}`",
        "",
        f"Batch {result['batch_size']}, {result['local_epochs']} local epoch(s) per round, "
        f"{result['steps_per_stage']} measured steps per stage on {result['device']} "
        f"({result['threads']} threads); transport `{result.get('transport', 'float32')}`; "
        f"memory method `{result['memory_method']}`; "
        f"bench wall time {result['wall_s']:.0f} s.",
        "",
    ]
    out += [f"- {note}" for note in result["notes"]] + ([""] if result["notes"] else [])
    out += [
        "| method | stage | rounds | trainable params | down, 1st round (MB) | down, later (MB) | up (MB) | "
        "peak mem (MiB) | params / grads / optim / activations (MiB) | GFLOPs per sample | "
        "cache fill GFLOPs per sample | cache KiB per sample |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in result["per_stage"]:
        if not r.get("measured"):
            out.append(f"| {r['method']} | {r['stage']} | {r['rounds']} | {r['trainable_params']:,} | "
                       "– | – | – | – | – | – | – | – |")  # fmt: skip
            continue
        b = r["memory"]["breakdown"] if r["memory"] else {}
        parts = " / ".join(
            _mib(b.get(k, 0)) for k in ("parameter", "gradient", "optimizer_state", "activation")
        )
        out.append(
            f"| {r['method']} | {r['stage']} | {r['rounds']} | {r['trainable_params']:,} | "
            f"{_mb(r['bytes_down_first'])} | {_mb(r['bytes_down_later'])} | {_mb(r['bytes_up'])} | "
            f"{_mib(r['peak_mem_bytes'])} | {parts} | {_num(r['flops_per_sample'] / 1e9)} | "
            f"{_num(r['fill_flops_per_sample'] / 1e9)} | {_num(r['cache_bytes_per_sample'] / 1024)} |"
        )
    out += [
        "",
        "Totals per client over the schedule (the client takes part in every round):",
        "",
        "| method | rounds | peak mem (MiB) | GFLOPs per local sample | up (MB) | down (MB) "
        "| total comm (MB) | cache KiB per sample |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, t in result["totals"].items():
        out.append(
            f"| {m} | {t['rounds']} | {_mib(t['peak_mem_bytes'])} | {_num(t['flops_per_sample'] / 1e9)} | "
            f"{_mb(t['bytes_up'])} | {_mb(t['bytes_down'])} | {_mb(t['bytes_total'])} | "
            f"{_num(t['cache_bytes_per_sample'] / 1024)} |"
        )
    out += [
        "",
        "Peak memory is the training step's working set. A client that keeps its frozen-prefix cache in "
        'memory (`cache.store = "memory"`) holds the cache on top: cache KiB per sample × its samples; '
        'with `cache.store = "disk"` the cache is on disk and each step reads one batch of it.',
    ]
    rat = result["ratios"]
    if rat:
        others = [m for m in result["totals"] if m != "e2e"]
        out += [
            "",
            'Savings, e2e ÷ method (paper: LW-FedMML vs FedMML, "up to"):',
            "",
            "| saving | " + " | ".join(f"{m} measured" for m in others) + " | paper, LW |",
            "|---|" + "---:|" * (len(others) + 1),
        ]
        names = {"memory": "peak memory", "flops": "FLOPs", "comm": "total communication"}
        for key, label in names.items():
            cells = " | ".join(_x(rat[key].get(m)) for m in others)
            out.append(f"| {label} | {cells} | {_x(result['paper_ratios'][key])} |")
    totals = result["totals"]
    if "lw" in totals and "lora" in totals:
        lw, lora = totals["lw"], totals["lora"]
        keys = (
            ("peak memory", "peak_mem_bytes"),
            ("FLOPs", "flops_per_sample"),
            ("communication", "bytes_total"),
        )
        cells = ", ".join(f"{label} {lw[key] / lora[key]:.2f}×" for label, key in keys if lora[key])
        out += ["", f"LW against LoRA adapters on the same encoders (lw ÷ lora): {cells}."]
    out += _upload_table(result)
    if result["rss_check"]:
        out += [
            "",
            "Cross-check in a fresh process (peak-memory stage, steady-state step): growth of live tensor "
            "bytes vs growth of peak RSS during the same step:",
            "",
            "| method | stage | tracked growth (MiB) | peak-RSS growth (MiB) | RSS ÷ tracked |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in result["rss_check"]:
            rss, tracked = c["rss_growth_bytes"], c["tracked_growth_bytes"]
            ratio = f"{rss / tracked:.2f}" if rss is not None and tracked else "–"
            rss_text = _mib(rss) if rss is not None else "n/a"
            out.append(f"| {c['method']} | {c['stage']} | {_mib(tracked)} | {rss_text} | {ratio} |")
    return "\n".join(out) + "\n"


def _upload_table(result: dict[str, Any]) -> list[str]:
    rows = [r for r in result["per_stage"] if r["method"] == "lw" and r.get("measured")]
    if not rows:
        return []
    out = [
        "",
        "LW upload per client-round by part (tensor bytes):",
        "",
        "| stage | encoder blocks (MB) | stems (MB) | norms + necks (MB) | heads (MB) | heads share |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["upload_parts"]
        total = sum(p.values()) or 1
        out.append(
            f"| {r['stage']} | {_mb(p['encoder_blocks'])} | {_mb(p['stems'])} | {_mb(p['norms_necks'])} | "
            f"{_mb(p['heads'])} | {100 * p['heads'] / total:.0f}% |"
        )
    return out


if __name__ == "__main__":
    _rss_child(Path(sys.argv[1]), Path(sys.argv[2]))
