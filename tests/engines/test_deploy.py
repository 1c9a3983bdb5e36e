"""A real loopback deployment: TLS SuperLink, two authenticated SuperNodes, an unregistered one refused."""

from __future__ import annotations

import json
import threading
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


def test_deploy_gives_each_node_only_its_own_folder(client_folders: dict, tmp_path: Path) -> None:
    from fedmml.cli import main

    gone = tmp_path / "nowhere"
    folders = [client_folders["clients"][0], str(gone), client_folders["clients"][2]]
    out = tmp_path / "run"
    args = ["deploy", "--preset", "tiny", "--quiet", "--out", str(out), "--node-data", *folders]
    for item in (f'data.root="{client_folders["server"]}"', *OVERRIDES[:1], "eval.every=0", "run.threads=1"):
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flower"]["status"] == "finished:completed"
    # The node given a missing folder is dropped at set-up with one line naming it; the others train.
    why = summary["setup_failures"]["1"]
    assert f"cannot use its data folder {gone}" in why and "\n" not in why
    assert summary["client_samples"] == {"0": 64, "2": 64}
    assert all(r["clients"] == [0, 2] for r in read_metrics(out))


def test_a_supernode_killed_mid_run_is_dropped_and_the_run_completes(
    client_folders: dict, tmp_path: Path
) -> None:
    # A real SuperNode process killed after round 1: Flower answers for the lost node itself (an error reply
    # from the SuperLink, not from the node), and the run goes on with the other two.
    from fedmml.engines.flower.deploy import LocalDeployment
    from fedmml.engines.flower.launch import follow_run, prepare
    from fedmml.engines.flower.processes import ProcessGroup

    roots = json.dumps(client_folders["clients"])
    overrides = [
        f'data.root="{client_folders["server"]}"',
        'partition.kind="local"',
        f"data.client_roots={roots}",
    ]
    overrides += [
        "schedules.uniform.rounds=[1, 2, 0]",
        "eval.every=0",
        "run.threads=1",
        'run.engine="flower"',
    ]
    cfg = load_config("tiny", overrides)
    out, home, env = prepare(cfg, tmp_path / "run")
    result: dict = {}
    with ProcessGroup(home / "logs", env) as procs:
        deployment = LocalDeployment(home, procs)
        deployment.start()
        nodes = deployment.start_nodes(3, client_folders["clients"])
        follower = threading.Thread(
            target=lambda: result.update(summary=follow_run(cfg, out, home, env, None, timeout=900))
        )
        follower.start()
        first = out / "checkpoints" / "round-000001.safetensors"
        deadline = time.monotonic() + 600
        while not first.exists() and follower.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.exists(), "round 1 never finished"
        nodes[2].kill()
        follower.join(timeout=900)
    assert result["summary"]["flower"]["status"] == "finished:completed"
    records = read_metrics(out)
    assert [r["clients"] for r in records] == [[0, 1, 2], [0, 1], [0, 1]]
    assert all(r["failed_clients"] == [2] for r in records[1:])
