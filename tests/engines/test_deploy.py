"""A real loopback deployment: TLS SuperLink, two authenticated SuperNodes, an unregistered one refused."""

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

from fedmml.config import load_config
from fedmml.experiment import build_setup
from fedmml.runs import read_metrics

pytestmark = pytest.mark.slow  # Flower runtimes: minutes each; `make test-fast` skips them

# LW over two rounds of tiny; evaluation only at the end keeps the two ClientApp rounds the main cost.
OVERRIDES = [
    "schedules.uniform.rounds=[1, 1, 0]",
    "federation.num_clients=2",
    "eval.every=0",
    "run.threads=1",
    'run.engine="flower"',
]


def test_tls_deployment_with_node_authentication(emoji_root: Path, tmp_path: Path) -> None:
    from fedmml.engines.flower import control
    from fedmml.engines.flower.deploy import LocalDeployment
    from fedmml.engines.flower.launch import follow_run, prepare
    from fedmml.engines.flower.processes import ProcessGroup

    cfg = load_config("tiny", [f'data.root="{emoji_root}"', *OVERRIDES])
    out, home, env = prepare(cfg, tmp_path / "run")
    with ProcessGroup(home / "logs", env) as procs:
        deployment = LocalDeployment(home, procs)
        deployment.start()
        nodes = deployment.start_nodes(2)
        intruder_key = deployment.node_key("intruder", register=False)
        intruder = deployment.start_node(0, 2, intruder_key, name="intruder")
        summary = follow_run(cfg, out, home, env, None, timeout=600)
        assert intruder.poll() not in (None, 0), "an unregistered SuperNode was let in"
        assert "Failed to activate SuperNode" in (home / "logs" / "intruder.log").read_text()
        listed = json.loads(control.flwr(["supernode", "ls", "fedmml", "--format", "json"], env).stdout)
        assert all(n.poll() is None for n in nodes)
    assert all(n.poll() is not None for n in [*nodes, intruder])  # every process was stopped

    assert summary["flower"]["status"] == "finished:completed"
    assert len(listed["nodes"]) == 2
    traffic = summary["flower"]["network-traffic"]
    records = read_metrics(out)
    assert len(records) == 2
    # The server validated every upload against the stage's trainable keys; their size matches in-process.
    reference = build_setup(load_config("tiny", [f'data.root="{emoji_root}"', *OVERRIDES[:-1]]))
    expected = reference.server.run(reference.engine)
    for got, want in zip(records, expected, strict=True):
        assert got["bytes_up"] == want["bytes_up"]
        assert got["bytes_down"] == want["bytes_down"]
    assert traffic["inbound-bytes"] >= summary["bytes_up_total"]
    assert traffic["outbound-bytes"] >= summary["bytes_down_total"]
    assert records[1]["bytes_up"] < records[0]["bytes_up"] / 4  # stage 2 sends only the new block and heads


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


def test_deploy_with_node_folders_survives_a_missing_folder_and_a_killed_node(
    client_folders: dict, tmp_path: Path
) -> None:
    # `fedmml deploy --node-data A B C`: each SuperNode reads only its own folder. B does not exist: its node
    # is dropped at set-up with one line. After round 1 C's SuperNode process is killed: Flower answers for
    # the lost node itself (an error reply from the SuperLink, not from the node) and the run completes.
    gone = tmp_path / "nowhere"
    kept = client_folders["clients"][2]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedmml.cli", "deploy", "--preset", "tiny", "--quiet", "--out", str(out)]
    cmd += ["--node-data", client_folders["clients"][0], str(gone), kept]
    for item in (f'data.root="{client_folders["server"]}"', "schedules.uniform.rounds=[1, 2, 0]"):
        cmd += ["--set", item]
    cmd += ["--set", "eval.every=0", "--set", "run.threads=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        first = out / "checkpoints" / "round-000001.safetensors"
        deadline = time.monotonic() + 600
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.exists(), "round 1 never finished"
        os.kill(_supernode_with(str(Path(kept).resolve())), signal.SIGKILL)
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
    assert summary["client_samples"] == {"0": 64, "2": 64}
    records = read_metrics(out)
    assert [r["clients"] for r in records] == [[0, 2], [0], [0]]
    assert all(r["failed_clients"] == [2] for r in records[1:])
