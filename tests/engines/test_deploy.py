"""`fedmml deploy` on loopback (TLS, node authentication, SecAgg+): nodes that read only their own folders, a
node whose folder is missing, and a SuperNode stopped mid-run. The docs' walk-through (without SecAgg+):
test_flower_doc.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower engine needs the optional extra fedmml[flower]")

from fedmml.runs import read_metrics

pytestmark = pytest.mark.slow  # Flower runtimes: minutes each; `make test-fast` skips them


def _supernode_with(folder: str) -> int:
    """The pid of the SuperNode process started with ``folder`` as its data-root."""
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-supernode" in cmd and f'data-root="{folder}"' in cmd:
            return int(entry.name)
    raise AssertionError(f"no SuperNode runs with {folder}")


def test_deploy_with_node_folders_survives_a_missing_folder_and_a_stopped_node(
    client_folders: dict, tmp_path: Path
) -> None:
    # `fedmml deploy --node-data A B C D` under secure aggregation: each SuperNode reads only its own folder.
    # B does not exist: its node is dropped at set-up with one line. After round 1 C's SuperNode process is
    # stopped: Flower answers for the lost node itself (an error reply from the SuperLink, not from the node)
    # at SecAgg+'s first stage, and the run completes on the sum of A's and D's updates.
    # SIGTERM makes the node sign off, so the SuperLink answers at once; after a SIGKILL it gives the same
    # "Node Unavailable" reply once two 30 s heartbeats are missed, a minute later.
    gone = tmp_path / "nowhere"
    kept = client_folders["clients"][2]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedmml.cli", "deploy", "--preset", "tiny", "--quiet", "--out", str(out)]
    cmd += ["--node-data", client_folders["clients"][0], str(gone), kept, client_folders["clients"][1]]
    for item in (f'data.root="{client_folders["server"]}"', "schedules.uniform.rounds=[1, 1, 0]"):
        cmd += ["--set", item]
    cmd += ["--set", "eval.every=0", "--set", "run.threads=1", "--set", "privacy.secure_aggregation=true"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        first = out / "checkpoints" / "round-000001.safetensors"
        deadline = time.monotonic() + 600
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.exists(), "round 1 never finished"
        os.kill(_supernode_with(str(Path(kept).resolve())), signal.SIGTERM)
        output = proc.communicate(timeout=900)[0].decode()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the CLI stops every process it started
            proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flower"]["status"] == "finished:completed"
    why = summary["setup_failures"]["1"]
    assert f"cannot use its data folder {gone}" in why and "\n" not in why
    assert summary["client_samples"] == {"0": 64, "2": 64, "3": 64}
    assert summary["secure_aggregation"]["protocol"] == "SecAgg+ (Flower)"
    records = read_metrics(out)
    assert [r["clients"] for r in records] == [[0, 2, 3], [0, 3]]
    assert all(r["failed_clients"] == [2] for r in records[1:])
