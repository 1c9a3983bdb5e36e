"""Runs that survive: exact resume after SIGKILL, client crashes and stragglers, poisoned updates."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmml.cli import main
from fedmml.config import load_config
from fedmml.experiment import build_setup
from fedmml.federation.payload import Message, deserialize, serialize

# Rounds [1, 2, 2]: a kill after round 2 lands in the middle of stage 2.
RUN_ARGS = ["--preset", "tiny", "--method", "lw", "--quiet", "--set", "run.threads=1"]
RUN_ARGS += ["--set", "schedules.uniform.rounds=[1, 2, 2]", "--set", "run.keep_checkpoints=0"]
# Timings, and memory measured once per stage.
VOLATILE = {"wall_s", "client_s", "client_train_s", "client_data_wait_s", "eval_s", "client_peak_mem_bytes"}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_equals_uninterrupted_run(emoji_root: Path, tmp_path: Path) -> None:
    data = ["--set", f'data.root="{emoji_root}"']
    reference = tmp_path / "reference"
    assert main(["run", *RUN_ARGS, *data, "--out", str(reference)]) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedmml.cli", "run", *RUN_ARGS, *data, "--out", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    target = killed / "checkpoints" / "round-000002.safetensors"
    deadline = time.monotonic() + 240
    try:
        while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert target.exists(), "the run never reached round 2"
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"

    assert main(["run", "--resume", str(killed), "--quiet"]) == 0
    want = json.loads((reference / "summary.json").read_text())
    got = json.loads((killed / "summary.json").read_text())
    assert _stable(got) == _stable(want)
    assert [_stable(r) for r in _records(killed)] == [_stable(r) for r in _records(reference)]


def test_crashes_and_stragglers_are_dropped_and_the_run_completes(emoji_root: Path, tmp_path: Path) -> None:
    args = [
        "run",
        "--preset",
        "tiny",
        "--quiet",
        "--out",
        str(tmp_path),
        "--set",
        f'data.root="{emoji_root}"',
    ]
    args += ["--set", "federation.num_clients=6", "--set", "federation.min_clients=2"]
    args += ["--set", "faults.crash_rate=0.3", "--set", "faults.straggler_rate=0.1"]
    args += ["--set", "faults.straggler_delay_s=100.0", "--set", "federation.client_timeout_s=60.0"]
    assert main(args) == 0
    records = _records(tmp_path)
    assert len(records) == 3 and all(len(r["clients"]) >= 2 or r.get("skipped") for r in records)
    assert sum(len(r["failed_clients"]) for r in records) > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(summary["rsum"])
    # Which clients missed which rounds, and when they came back, in the summary and the report too.
    missed = {str(c): [r["round"] for r in records if c in r["failed_clients"]] for c in range(6)}
    assert {c: m["missed"] for c, m in summary["missed_rounds"].items()} == {
        c: m for c, m in missed.items() if m
    }
    assert "## Clients that missed rounds" in (tmp_path / "report.md").read_text()


class Poisoned:
    """Wraps a client and corrupts its replies in one of several ways."""

    def __init__(self, client, how: str) -> None:
        self.client, self.how = client, how
        self.describe = client.describe

    def handle(self, message: Message) -> Message:
        reply = self.client.handle(message)
        tensors = deserialize(reply.blob)
        key = sorted(tensors)[0]
        if self.how == "nan":
            tensors[key] = torch.full_like(tensors[key], float("nan"))
        elif self.how == "inf":  # one value among finite ones
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = float("inf")
        elif self.how == "shape":
            tensors[key] = torch.zeros(3, 3)
        elif self.how == "missing":
            del tensors[key]
        elif self.how == "huge":
            tensors = {k: v * 1e6 if v.is_floating_point() else v for k, v in tensors.items()}
        return Message(reply.meta, serialize(tensors))


def test_poisoned_updates_are_rejected_and_never_reach_the_model(emoji_root: Path) -> None:
    cfg = load_config(
        "tiny",
        [f'data.root="{emoji_root}"', "federation.num_clients=6", "federation.max_update_norm=10.0"],
    )
    setup = build_setup(cfg)
    kinds = ["nan", "shape", "missing", "huge", "inf"]
    for cid, how in enumerate(kinds):
        setup.clients[cid] = Poisoned(setup.clients[cid], how)
    metrics = setup.server.run(setup.engine)
    for record in metrics:
        assert set(record["rejected_clients"]) == {"0", "1", "2", "3", "4"}
        assert record["clients"] == [5]
    reasons = metrics[0]["rejected_clients"]
    assert "non-finite" in reasons["0"] and "expected" in reasons["1"]
    assert "missing" in reasons["2"] and "exceeds" in reasons["3"] and "non-finite" in reasons["4"]
    assert all(
        torch.isfinite(v).all() for v in setup.server.model.state_dict().values() if v.is_floating_point()
    )


class Crashing:
    """A client whose device always fails before replying (after a normal set-up)."""

    def describe(self) -> dict:
        return {"num_samples": 1}

    def handle(self, message: Message) -> Message:
        raise RuntimeError("device lost")


def test_backfill_replaces_failed_clients_within_the_round(emoji_root: Path) -> None:
    overrides = [f'data.root="{emoji_root}"', "federation.num_clients=5", "federation.clients_per_round=3"]
    setup = build_setup(load_config("tiny", [*overrides, "federation.backfill=2"]))
    setup.clients[0] = setup.clients[1] = Crashing()
    metrics = setup.server.run(setup.engine)
    # Two waves of replacements always find three healthy clients among five with two lost.
    assert all(len(r["clients"]) == 3 and not {0, 1} & set(r["clients"]) for r in metrics)
    assert all(set(r["failed_clients"]) <= {0, 1} for r in metrics)
    failed = [r for r in metrics if r["failed_clients"]]
    assert failed, "the seeded sampling never drew a crashing client"
    assert all(r["backfilled_clients"] for r in failed)
    assert all(not r["backfilled_clients"] for r in metrics if not r["failed_clients"])
    # Every client asked was either sampled or a replacement; replacements are never asked twice.
    for r in failed:
        assert len(set(r["backfilled_clients"])) == len(r["backfilled_clients"])


@pytest.mark.slow
def test_sigterm_stops_a_run_cleanly_and_it_resumes(emoji_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedmml.cli", "run", *RUN_ARGS, "--set", f'data.root="{emoji_root}"']
    # Enough rounds that the signal lands mid-run; evaluation only at the end keeps them short.
    cmd += ["--set", "schedules.uniform.rounds=[1, 3, 3]", "--set", "eval.every=0", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    first = out / "checkpoints" / "round-000001.safetensors"
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130 and "fedmml run --resume" in output
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert len(_records(out)) == 7
