"""``fedmml bench speed``: training samples per second of e2e, lw and prog on a preset, and the wall time of
the preset's full schedules at those rates.

Each setting (method, precision, loader, clients at once, compiled or not) runs in a fresh process through a
run's own code path: the server, the engine (in-process, or worker processes for several clients at once)
and the clients, on the preset's architecture (random initialisation when its pretrained weights are not on
this machine). lw and prog train their last stage of the ``late-heavy`` schedule (the growth before it runs
no rounds), e2e its one stage. Round 1 is the warm-up (start-up, the accounting's measured steps, a
frozen-prefix cache's fill, compilation); round 2 is timed. Every client holds ``steps`` batches.

- ``samples_per_s``: samples trained in round 2 over its wall time (messages, loading, replies and
  aggregation included; evaluation excluded);
- ``loop_samples_per_s``: the same samples over the time the clients spent in their step loops (per client,
  averaged over the clients that train at once);
- ``data_wait_share``: the part of the loop spent waiting for batches (near 0: the loader keeps up);
- ``first_step_s``: from starting the process to the first training step (one client, real loader);
- ``client_peak_mem_bytes``: the accounting's per-client figure (on a GPU the allocator's peak over a
  measured step) and ``tracked_peak_bytes``, the live-tensor figure of the same step.

The projection multiplies each method's schedule (rounds x local epochs x training samples, ``--samples``:
COCO's 118,287 for paper-coco) by its best measured round rate with the real loader. Round 2 of a bench
client is a few dozen steps, a COCO client's round about a thousand, so the per-round costs weigh more here
than in a real run: the projection errs long. Evaluation and cache fills are not in it.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedmml.cache import cache_dir
from fedmml.config import SPEED_METHODS, Config, ConfigError, config_from_dict

SCHEDULE_OF = {"e2e": "uniform", "lw": "late-heavy", "prog": "late-heavy"}  # the projections
COCO_TRAIN = 118_287  # train2017 images
TEST_IMAGES = 64  # the split the run's final evaluation reads (not timed)
SETTING_TIMEOUT_S = 300

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Setting:
    """One measured configuration."""

    method: str
    precision: str
    loader: str  # real: the run's DataLoader over the folder; memory: the same samples read beforehand
    parallel: int  # clients trained at once
    compile: bool

    @property
    def name(self) -> str:
        """A short label, e.g. ``e2e-bf16-real-x4-compiled``."""
        tail = "-compiled" if self.compile else ""
        return f"{self.method}-{self.precision}-{self.loader}-x{self.parallel}{tail}"


def settings(
    cfg: Config,
    methods: Collection[str],
    precisions: Collection[str],
    loaders: Collection[str],
    parallel: Collection[int],
    compiled: Collection[bool],
) -> list[Setting]:
    """Every combination, each count of clients at once once (0: chosen from the device, see
    :func:`fedmml.engines.parallel.parallel_clients`), but samples read beforehand only for one client at a
    time (the workers of several clients open their own data)."""
    counts = list(dict.fromkeys(p or _auto_clients(cfg) for p in parallel))
    grid = itertools.product(methods, precisions, loaders, counts, compiled)
    return [Setting(*s) for s in grid if not (s[2] == "memory" and s[3] != 1)]


def speed_config(cfg: Config, setting: Setting, steps: int, data: Path) -> Config:
    """``cfg`` as one setting runs it: its method at its last late-heavy stage (e2e: one stage), 2 rounds,
    one local epoch, ``steps`` batches per client, one client per worker process, no checkpoints."""
    tree = cfg.to_dict()
    clients = setting.parallel
    batch = tree["federation"]["batch_size"]
    tree["run"].update(method=setting.method, precision=setting.precision, compile=setting.compile)
    tree["run"]["engine"] = "inprocess"
    tree["federation"].update(
        num_clients=clients, clients_per_round=0, local_epochs=1, parallel_clients=clients
    )
    tree["federation"].update(client_memory_mib=0.0, backfill=0, client_timeout_s=0.0)
    tree["partition"]["kind"] = "iid"
    tree["data"].update(root=str(data), limit_train=clients * steps * batch, limit_test=TEST_IMAGES)
    if setting.loader == "memory":
        tree["data"]["workers"] = 0
    tree["eval"].update(every=0, zeroshot=False, where="server", split="test")
    schedule = tree["schedules"][SCHEDULE_OF[setting.method]]
    stages = len(schedule["rounds"])
    schedule["rounds"] = [0] * (stages - 1) + [2]
    tree["schedule"] = SCHEDULE_OF[setting.method]
    for modality in cfg.model.modalities:
        encoder = tree["model"][modality]
        if encoder["pretrained"] not in ("", "package") and not Path(encoder["pretrained"]).exists():
            encoder["pretrained"] = ""  # the hub is out of reach: the same architecture, randomly initialised
        if setting.compile and modality == "text" and not encoder["pad_multiple"]:
            # A few token lengths instead of one per batch: the compiled code is reused, not recompiled.
            encoder["pad_multiple"] = 8 if encoder["max_length"] % 8 == 0 else encoder["max_length"]
    return config_from_dict(tree)


def _auto_clients(cfg: Config) -> int:
    from fedmml.device import select_device
    from fedmml.engines.parallel import MAX_AUTO, parallel_clients

    tree = cfg.to_dict()
    tree["federation"].update(num_clients=MAX_AUTO, clients_per_round=0, parallel_clients=0)
    return parallel_clients(config_from_dict(tree), select_device(cfg.run.device))


# One setting, in its own process ---------------------------------------------------------------------------


class Preloaded(Dataset):
    """A client's training samples for the given epochs, read before the clock starts: the same batches as
    the real loader gives, without reading or decoding."""

    def __init__(self, dataset: Any, epochs: Collection[int]) -> None:
        self.dataset = dataset
        self.samples = {(i, e): dataset.take(i, e)[0] for e in epochs for i in range(len(dataset))}
        self.collate = dataset.collate

    def __len__(self) -> int:
        return len(self.dataset)

    def take(self, index: int, epoch: int, skip: Collection[str] = ()) -> tuple[Any, int]:
        """The sample read beforehand; with ``skip`` (a cache holds those inputs), the dataset's own answer,
        which reads nothing."""
        if skip:
            return self.dataset.take(index, epoch, skip)
        return self.samples[(index, epoch)], 0

    def variants(self, index: int, views: int = 1) -> dict[str, list[Any]]:
        """What a frozen-prefix cache stores of a sample, from the dataset itself."""
        return self.dataset.variants(index, views)


def measure(
    cfg: Config, setting: Setting, steps: int, launched: float, profile: Path | None
) -> dict[str, Any]:
    """Run ``setting`` in this process and return its figures (see the module's docstring)."""
    from fedmml.events import Phase, RoundDone, RoundStarted
    from fedmml.experiment import build_setup

    marks: dict[str, Any] = {}
    profiler: list[torch.profiler.profile] = []
    rounds = 3 if profile is not None else 2

    def listen(event: Any) -> None:
        if isinstance(event, RoundDone) and event.record["round"] == 1 and setup.clients:
            training = next(iter(setup.clients.values())).last_training
            marks["first_step_at"] = training.first_step_at if training else None
        if isinstance(event, RoundStarted) and event.round == 3 and profile is not None:
            profiler.append(_profiler())
            profiler[0].start()
        stop = isinstance(event, RoundDone) or (isinstance(event, Phase) and event.text == "evaluating")
        if stop and profiler and marks.get("profiled") is None:
            _synchronize()
            profiler[0].stop()
            marks["profiled"] = True

    if profile is not None:
        tree = cfg.to_dict()
        tree["schedules"][cfg.schedule]["rounds"][-1] = rounds
        cfg = config_from_dict(tree)
    setup = build_setup(cfg, listen)
    if setting.loader == "memory":
        for client in setup.clients.values():
            epochs = [r * cfg.federation.local_epochs for r in range(1, rounds + 1)]
            client.dataset = Preloaded(client.dataset, epochs)
    metrics = setup.run_rounds()
    timed = metrics[1]
    clients = len(timed["clients"])
    samples = clients * steps * cfg.federation.batch_size
    wall = timed["wall_s"] - timed.get("eval_s", 0.0)
    loop_s = timed.get("client_train_s", 0.0) / max(clients, 1)
    result: dict[str, Any] = {
        "preset": cfg.preset,
        **asdict(setting),
        "stage": timed["stage"],
        "device": _device_name(),
        "batch": cfg.federation.batch_size,
        "steps_per_client": steps,
        "clients": clients,
        "samples_per_s": round(samples / wall, 1),
        "loop_samples_per_s": round(samples / loop_s, 1) if loop_s else None,
        "data_wait_share": round(timed.get("client_data_wait_s", 0.0) / timed["client_train_s"], 3)
        if timed.get("client_train_s")
        else None,
        "round1_s": round(metrics[0]["wall_s"], 2),
        "first_step_s": None,
        "client_peak_mem_bytes": timed.get("client_peak_mem_bytes")
        or metrics[0].get("client_peak_mem_bytes"),
    }
    if setting.loader == "real" and marks.get("first_step_at"):
        result["first_step_s"] = round(marks["first_step_at"] - launched, 1)
    if setup.workspace is not None:
        peaks = list(setup.workspace.meter.memory.values())
        if peaks:
            result["tracked_peak_bytes"] = max(p.tracked_peak_bytes for p in peaks)
        if torch.cuda.is_available():
            result["process_cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    if profiler and setup.clients:
        training = next(iter(setup.clients.values())).last_training
        summary = profile_summary(profiler[0], training.steps, training.train_s)
        result["profile"] = summary
        profile.mkdir(parents=True, exist_ok=True)
        (profile / f"profile-{setting.name}.json").write_text(json.dumps(summary, indent=1))
    return result


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _profiler() -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


PHASES = (
    "fedmml.load",
    "fedmml.prepare",
    "fedmml.meter",
    "fedmml.forward",
    "fedmml.backward",
    "fedmml.optimizer",
)


def profile_summary(prof: torch.profiler.profile, steps: int, train_s: float) -> dict[str, Any]:
    """Where a profiled round's step loop spent its time, per step: the host's time in each phase of
    :mod:`fedmml.federation.training` (loading, preparing inputs, the accounting, forward, backward,
    optimizer), the rest of the loop, the device's kernel time, and the ops that cost most on each side."""
    events = prof.key_averages()
    per_step = 1e3 / max(steps, 1)  # seconds -> ms per step

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
    wall_ms = train_s * per_step
    host = {k.removeprefix("fedmml."): round(v * per_step, 3) for k, v in phases.items()}
    host["other"] = round(wall_ms - sum(host.values()), 3)
    kernels_ms = sum(device_us(e) for e in events) / 1e3 / max(steps, 1)
    ops = [e for e in events if not e.key.startswith("fedmml.") and not e.key.startswith("ProfilerStep")]
    top_host = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    top_device = sorted(ops, key=device_us, reverse=True)[:12]
    return {
        "steps": steps,
        "wall_ms_per_step": round(wall_ms, 3),
        "host_ms_per_step": host,
        "device_kernel_ms_per_step": round(kernels_ms, 3),
        "device_busy_share": round(kernels_ms / wall_ms, 3) if wall_ms else None,
        "top_host_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 3) for e in top_host},
        "top_device_ops_ms_per_step": {
            e.key: round(device_us(e) / 1e3 / steps, 3) for e in top_device if device_us(e) > 0
        },
    }


# The command ----------------------------------------------------------------------------------------------


def prepare_data(cfg: Config, data: Path | None, images: int, progress: Progress) -> Path:
    """The folder the settings read: ``data``, else the preset's own when it exists, else synthetic
    COCO-shaped photographs (made once under ``~/.cache/fedmml``); its image store is made before any
    setting starts."""
    from fedmml.client_data import SharedSplit

    if data is None and Path(cfg.data.root).is_dir():
        data = Path(cfg.data.root)
    if data is None:
        if cfg.model.task != "image-text":
            raise ConfigError(f"fedmml bench speed needs --data for a {cfg.model.task} preset")
        from fedmml.data.synthetic import write_folder

        data = cache_dir(f"speed-coco-{images}")
        progress(f"writing {images:,} synthetic photographs to {data}")
        write_folder(data, images, TEST_IMAGES)
    tree = cfg.to_dict()
    tree["data"].update(root=str(data), limit_train=0, limit_test=0)
    tree["federation"].update(num_clients=1, clients_per_round=0, parallel_clients=1, client_memory_mib=0.0)
    tree["partition"]["kind"] = "iid"
    progress(f"preparing the image store of {data}")
    SharedSplit(config_from_dict(tree)).client(0)
    return data


def run_speed(
    cfg: Config,
    chosen: list[Setting],
    steps: int,
    data: Path | None = None,
    samples: int = 0,
    profile: Path | None = None,
    progress: Progress | None = None,
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure every setting in a fresh process; return the rows and the projections."""
    say = progress or (lambda msg: None)
    most = max(s.parallel for s in chosen) * steps * cfg.federation.batch_size
    folder = prepare_data(cfg, data, most, say)
    rows = []
    for i, setting in enumerate(chosen, 1):
        say(f"[{i}/{len(chosen)}] {setting.name}")
        row = _in_fresh_process(cfg, setting, steps, folder, profile)
        rows.append(row)
        if emit is not None:
            emit(row)
    result = {"rows": rows, "projection": project(cfg, rows, samples or _train_samples(cfg, folder))}
    if emit is not None:
        emit({"projection": result["projection"]})
    return result


def _train_samples(cfg: Config, folder: Path) -> int:
    return COCO_TRAIN if cfg.preset.startswith("paper-coco") else _count_train(cfg, folder)


def _count_train(cfg: Config, folder: Path) -> int:
    from fedmml.data.coco import read_caption_index

    return len(read_caption_index(folder, cfg.data.train_split, cfg.data.images_dir))


def _in_fresh_process(cfg: Config, setting: Setting, steps: int, data: Path, profile: Path | None) -> dict:
    spec = {
        "config": speed_config(cfg, setting, steps, data).to_dict(),
        "setting": asdict(setting),
        "steps": steps,
        "launched": time.time(),
        "profile": str(profile) if profile is not None and setting.parallel == 1 else "",
    }
    cmd = [sys.executable, "-m", "fedmml.speed", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=SETTING_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {**asdict(setting), "error": f"no result within {SETTING_TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**asdict(setting), "error": tail}
    return json.loads(lines[-1])


def project(cfg: Config, rows: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    """Per method, the wall time of its full schedule at its best measured rate with the real loader."""
    out = {}
    for method in SPEED_METHODS:
        measured = [
            r for r in rows if r.get("method") == method and r.get("loader") == "real" and "error" not in r
        ]
        if not measured:
            continue
        best = max(measured, key=lambda r: r["samples_per_s"])
        schedule = cfg.schedules[SCHEDULE_OF[method]]
        rounds = sum(schedule.rounds)
        share = (cfg.federation.clients_per_round or cfg.federation.num_clients) / cfg.federation.num_clients
        per_round = samples * share * cfg.federation.local_epochs
        seconds = rounds * per_round / best["samples_per_s"]
        out[method] = {
            "schedule": SCHEDULE_OF[method],
            "rounds": rounds,
            "samples_per_round": int(per_round),
            "setting": _label(best),
            "samples_per_s": best["samples_per_s"],
            "seconds": round(seconds, 1),
            "hours": round(seconds / 3600, 2),
        }
    return out


def _label(row: dict[str, Any]) -> str:
    return Setting(row["method"], row["precision"], row["loader"], row["parallel"], row["compile"]).name


def render_markdown(result: dict[str, Any]) -> str:
    """The rows and the projections as Markdown tables."""
    out = [
        "| setting | stage | clients at once | samples/s | loop samples/s | loader wait | first step (s) "
        "| round 1 (s) | client peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            out.append(f"| {_label(r)} | error: {r['error']} | | | | | | | |")
            continue
        wait = f"{100 * r['data_wait_share']:.0f} %" if r.get("data_wait_share") is not None else "–"
        peak = r.get("client_peak_mem_bytes") or 0
        out.append(
            f"| {_label(r)} | {r['stage']} | {r['parallel']} | {r['samples_per_s']:,.1f} | "
            f"{_opt(r.get('loop_samples_per_s'))} | {wait} | {_opt(r.get('first_step_s'))} | "
            f"{r['round1_s']:.1f} | {peak / 2**20:,.1f} |"
        )
    if result["projection"]:
        out += [
            "",
            "| method | schedule | rounds | samples per round | at (setting) | samples/s | projected hours |",
            "|---|---|---:|---:|---|---:|---:|",
        ]
        for method, p in result["projection"].items():
            out.append(
                f"| {method} | {p['schedule']} | {p['rounds']} | {p['samples_per_round']:,} | "
                f"{p['setting']} | {p['samples_per_s']:,.1f} | {p['hours']:,.2f} |"
            )
    return "\n".join(out) + "\n"


def _opt(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def _child(spec: dict[str, Any]) -> None:
    cfg = config_from_dict(spec["config"])
    setting = Setting(**spec["setting"])
    profile = Path(spec["profile"]) if spec["profile"] else None
    print(json.dumps(measure(cfg, setting, spec["steps"], spec["launched"], profile)), flush=True)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
