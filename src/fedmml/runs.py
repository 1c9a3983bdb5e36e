"""The run directory, and the only code that writes it: ``config.json``, ``metrics.jsonl``, checkpoints,
``model.safetensors``, ``summary.json``, ``report.md`` and the plots.

A directory that already holds a run is never replaced unless the caller asks (``overwrite``); a stopped run
is continued with :func:`reopen_run`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedmml import report
from fedmml.accounting import memory_method
from fedmml.config import Config, config_from_dict
from fedmml.data.missing import incomplete
from fedmml.device import select_device
from fedmml.events import Event, Listener, Notice, Phase, RoundDone, RunFinished, ignore
from fedmml.federation import budgets, secure
from fedmml.federation.checkpoint import CheckpointDamaged, checkpoints, latest_checkpoint, load_checkpoint
from fedmml.models.build import build_model
from fedmml.models.multimodal import MultimodalModel
from fedmml.precision import autocast
from fedmml.setup import ServerSide, final_depth
from fedmml.tasks import task_for
from fedmml.tracking import TENSORBOARD_DIR, track

CHECKPOINTS = "checkpoints"
Checkpoint = tuple[dict[str, torch.Tensor], dict[str, Any]]
# What a run writes into its directory (config.json first); a new run clears them. The MLflow store stays:
# the new run replaces the old one's MLflow run in it (fedmml.tracking).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", CHECKPOINTS, TENSORBOARD_DIR)


class RunExists(FileExistsError):
    """The output directory already holds a run."""


class RunBusy(RunExists):
    """Another process is writing the run directory."""


LOCK = ".fedmml-lock"  # held (flock) by the one process that writes the run directory
OWNER = ".fedmml-owner.json"  # which process that is


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s writer lock for the block. A second writer (a run into the same --out, a resume
    of a run still going) is refused in one line naming the process that holds it; the lock goes with its
    process however that ends, a kill included."""
    lock = FileLock(str(run_dir / LOCK), is_singleton=False)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise RunBusy(
            f"{run_dir} is being written by {_owner(run_dir)}; wait for it to end or stop it"
        ) from None
    except OSError as err:
        raise OSError(f"cannot write to the run directory {run_dir}: {err.strerror}") from None
    owner = run_dir / OWNER
    owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
    try:
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _owner(run_dir: Path) -> str:
    """The process that holds ``run_dir``'s lock, in words."""
    try:
        owner = json.loads((run_dir / OWNER).read_text())
    except (OSError, ValueError):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"]))
    return f"process {owner['pid']} on {owner['host']} (since {since})"


def read_run_config(run_dir: Path) -> Config:
    """A run's config.json as this version reads it: keys added since the run was made take defaults."""
    return config_from_dict(json.loads((run_dir / "config.json").read_text()))


def save_model(model: MultimodalModel, path: Path) -> None:
    """Weights as safetensors (the architecture is rebuilt from the run's config.json)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_run_model(run_dir: Path, device: torch.device | None = None) -> tuple[Config, MultimodalModel]:
    """The config and final global model of a finished run."""
    cfg = read_run_config(run_dir)
    model = build_model(
        cfg.model, load_weights=False, adapters=cfg.run.method == "lora", missing=incomplete(cfg)
    )
    for modality, depth in final_depth(cfg).items():
        model.encoders[modality].grow_to(depth)
    path = run_dir / "model.safetensors"
    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CheckpointDamaged(f"{path} cannot be read ({err}); it is written when a run finishes") from None
    model.load_state_dict(weights, strict=True)
    return cfg, model.to(device or torch.device("cpu"))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-round records of a run."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


class MetricsWriter:
    """Appends each finished round to metrics.jsonl as it happens, then forwards the event."""

    def __init__(self, path: Path, forward: Listener | None) -> None:
        self.path = path
        self.forward = forward

    def __call__(self, event: Event) -> None:
        if isinstance(event, RoundDone):
            with self.path.open("a") as f:
                f.write(json.dumps(event.record) + "\n")
        if self.forward is not None:
            self.forward(event)


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a run worth protecting: a finished one, or one with a checkpoint to continue
    from. A folder a run left before its first round ended (its set-up failed, or it was stopped) holds
    nothing a new run would lose."""
    return (out_dir / "summary.json").exists() or latest_checkpoint(out_dir / CHECKPOINTS) is not None


def claim_run_dir(out_dir: Path, overwrite: bool = False) -> None:
    """Make ``out_dir`` ready for a new run; one holding a run is refused, or cleared with ``overwrite``."""
    if holds_run(out_dir) and not overwrite:
        raise RunExists(
            f"{out_dir} already holds a run; continue it with `fedmml run --resume {out_dir}`, "
            "choose another --out, or pass --overwrite to replace it"
        )
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    probe = out_dir / ".write-test"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write to the run directory {out_dir}: {err.strerror}") from None


def start_run(cfg: Config, out_dir: Path, listener: Listener | None = None) -> Listener:
    """Write config.json and an empty metrics.jsonl into a claimed directory; return the recording
    listener."""
    (out_dir / "config.json").write_text(cfg.to_json())
    (out_dir / "metrics.jsonl").write_text("")
    return MetricsWriter(out_dir / "metrics.jsonl", track(cfg, out_dir, listener))


def reopen_run(run_dir: Path, listener: Listener | None = None) -> tuple[Config, Checkpoint, Listener]:
    """A stopped run's config and newest checkpoint that reads, and a listener that appends to its
    metrics.jsonl. A damaged checkpoint (torn by a crash or a full disk) is passed over, saying so.

    Rounds after the checkpoint are redone, so their lines are dropped from metrics.jsonl.
    """
    cfg = read_run_config(run_dir)
    say = listener or ignore
    found = checkpoints(run_dir / CHECKPOINTS)
    if not found:
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint (it stopped before its first round ended): run the same command "
            "again, without --resume, to start it again"
        )
    damaged = []
    for path in found:
        try:
            tensors, state = load_checkpoint(path)
        except CheckpointDamaged as err:
            damaged.append(str(err))
            continue
        if damaged:
            say(
                Notice(f"passed over a damaged checkpoint: {'; '.join(damaged)}; continuing from {path.name}")
            )
        break
    else:
        raise CheckpointDamaged(f"no checkpoint in {run_dir / CHECKPOINTS} can be read: {'; '.join(damaged)}")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in state["metrics"]))
    trackers = track(cfg, run_dir, listener, history=state["metrics"])
    return cfg, (tensors, state), MetricsWriter(run_dir / "metrics.jsonl", trackers)


def train_data_summary(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Training samples and skips over the clients that reported them; a shared source's own malformed
    entries are counted once, not once per client that cut its share from it."""
    skipped: dict[str, int] = {}
    sources: dict[str, dict[str, int]] = {}
    for client in reports.values():
        for key, count in client.get("skipped", {}).items():
            skipped[key] = skipped.get(key, 0) + count
        sources[client.get("source", "")] = client.get("source_skipped", {})
    for counts in sources.values():
        for key, count in counts.items():
            skipped[key] = skipped.get(key, 0) + count
    summary = {"train_images": sum(r["num_samples"] for r in reports.values()), "train_skipped": skipped}
    # Incomplete data (fedmml.data.missing): per modality, the training samples that lack it, used or dropped.
    for key in ("incomplete_samples", "incomplete_dropped"):
        counts: dict[str, int] = {}
        for client in reports.values():
            for modality, count in client.get(key, {}).items():
                counts[modality] = counts.get(modality, 0) + count
        if counts:
            summary[key] = counts
    return summary


def missed_rounds(metrics: list[dict[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """Per client (a node) that failed a round it was asked to train: those rounds, and the rounds in which
    it came back (trained again after missing one)."""
    out: dict[str, dict[str, list[int]]] = {}
    away: set[int] = set()
    for record in metrics:
        for cid in record.get("failed_clients", []):
            out.setdefault(str(cid), {"missed": [], "rejoined": []})["missed"].append(record["round"])
            away.add(cid)
        for cid in sorted(away & set(record.get("clients", []))):
            out[str(cid)]["rejoined"].append(record["round"])
            away.discard(cid)
    return out


def finish_run(
    cfg: Config,
    out_dir: Path,
    side: ServerSide,
    metrics: list[dict[str, Any]],
    started: float,
    emit: Listener,
) -> dict[str, Any]:
    """Write the model, summary.json and the report of a finished run; return the summary."""
    server, test = side.server, side.test
    emit(Phase("writing outputs"))
    save_model(server.model, out_dir / "model.safetensors")
    task = task_for(cfg)
    final = next(m for m in reversed(metrics) if task.score_key in m)
    data = train_data_summary(server.clients)
    summary: dict[str, Any] = {
        "task": task.name,
        "method": cfg.run.method,
        "preset": cfg.preset,
        "seed": cfg.run.seed,
        "schedule": cfg.schedule,
        "rounds": len(metrics),
        "stages": len(server.stages),
        "clients": cfg.federation.num_clients,
        **{k: final[k] for k in task.summary_keys},
        "bytes_up_total": sum(m["bytes_up"] for m in metrics),
        "bytes_down_total": sum(m["bytes_down"] for m in metrics),
        # Measured per client (fedmml.accounting): FLOPs summed over the run, peak memory as the maximum.
        "client_flops_total": sum(m.get("client_flops", 0) for m in metrics),
        "client_peak_mem_bytes": max((m.get("client_peak_mem_bytes", 0) for m in metrics), default=0),
        "memory_method": memory_method(select_device(cfg.run.device)),
        # Reported by the clients at set-up: the server itself never opens a training file.
        "train_images": data["train_images"],
        "test_images": len(test) if test is not None else final.get("test_images", 0),
        "skipped": {
            "train": {
                **data["train_skipped"],
                # found while training (an image that broke after set-up): passed over, counted per read
                "unreadable_at_access": sum(m.get("unreadable_images", 0) for m in metrics),
            },
            "test": test.skipped if test is not None else {},
        },
        **{k: data[k] for k in ("incomplete_samples", "incomplete_dropped") if k in data},
        "client_samples": {str(c): r["num_samples"] for c, r in server.clients.items()},
        "setup_failures": {str(c): r for c, r in server.setup_failures.items()},
        "missed_rounds": missed_rounds(metrics),
        # server: whole-split scores on the server's test split; federated: combined from the clients' own
        # held-out splits (retrieval then is local-gallery recall, see tasks.ImageText.combine_scores)
        "evaluation": cfg.eval.where,
        "eval_split": cfg.eval.split,
    }
    if server.privacy is not None:
        summary["privacy"] = server.privacy.describe()
    if server.privacy_stop:
        summary["stopped_early"] = server.privacy_stop
    if server.secure:
        summary["secure_aggregation"] = secure.describe(cfg.privacy, server.privacy is not None)
    if server.plans:
        # Memory budgets: each client's slice per stage and how its measured peaks compared with its budget.
        summary["budgets"] = budgets.summarize(metrics, server.limits)
    with autocast(cfg.run.precision, server.model.device):
        summary.update(task.summarize(server.model, test, cfg, out_dir, final))
    summary["wall_s"] = time.perf_counter() - started
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    report.write_run_report(out_dir, cfg.to_dict(), summary, metrics)
    emit(RunFinished(summary, str(out_dir)))
    return summary
