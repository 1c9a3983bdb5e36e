"""`fedmml deploy` on loopback (TLS, node authentication): nodes that read only their own folders, a node
whose folder is missing, and a SuperNode killed mid-run. docs/flower.md's walk-through: test_flower_doc.py."""

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


def _supernode_with(folder: str) -> tuple[int, list[str], dict[str, str]]:
    """The pid, argv and environment of the SuperNode process started with ``folder`` as its data-root."""
    for entry in Path("/proc").iterdir():
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            environ = (entry / "environ").read_bytes().decode().split("\0")
        except OSError:
            continue
        command = " ".join(argv)
        if "flower-supernode" in command and f'data-root="{folder}"' in command:
            return int(entry.name), argv, dict(v.split("=", 1) for v in environ if "=" in v)
    raise AssertionError(f"no SuperNode runs with {folder}")


def test_deploy_with_node_folders_survives_a_missing_folder_and_a_killed_node(
    client_folders: dict, tmp_path: Path
) -> None:
    # `fedmml deploy --node-data A B C`: each SuperNode reads only its own folder. B does not exist: its node
    # is dropped at set-up with one line. After round 1 C's SuperNode process is killed: Flower answers for
    # the lost node itself (an error reply from the SuperLink, not from the node) and the run goes on. C is
    # restarted at once with its key, as a supervisor would; Flower refuses it until it has marked the old
    # process offline (up to a minute), then it rejoins, is set up again and trains.
    gone = tmp_path / "nowhere"
    kept = client_folders["clients"][2]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedmml.cli", "deploy", "--preset", "tiny", "--quiet", "--out", str(out)]
    cmd += ["--node-data", client_folders["clients"][0], str(gone), kept]
    for item in (f'data.root="{client_folders["server"]}"', "schedules.uniform.rounds=[1, 2, 1]"):
        cmd += ["--set", item]
    cmd += ["--set", "eval.every=0", "--set", "run.threads=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    restarted: subprocess.Popen | None = None
    starts = 0
    try:
        first = out / "checkpoints" / "round-000001.safetensors"
        deadline = time.monotonic() + 600
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.exists(), "round 1 never finished"
        pid, argv, env = _supernode_with(str(Path(kept).resolve()))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if restarted is None or restarted.poll() is not None:
                time.sleep(2)  # a refused start exits at once; try again, as a supervisor would
                log = open(tmp_path / f"restart-{starts}.log", "wb")  # noqa: SIM115 - closed with the process
                restarted = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
                starts += 1
            time.sleep(0.5)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        for child in (proc, restarted):
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGINT)  # the CLI stops every process it started
                child.communicate(timeout=120)
    assert proc.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flower"]["status"] == "finished:completed"
    why = summary["setup_failures"]["1"]
    assert f"cannot use its data folder {gone}" in why and "\n" not in why
    assert summary["client_samples"] == {"0": 64, "2": 64}
    records = read_metrics(out)
    assert [r["clients"] for r in records[:2]] == [[0, 2], [0]]
    assert records[1]["failed_clients"] == [2]
    # Back no later than the last round (the round before may go out while Flower still refuses it).
    assert records[3]["clients"] == [0, 2] and records[3]["failed_clients"] == []
