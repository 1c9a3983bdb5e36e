"""A real loopback deployment: TLS SuperLink, two authenticated SuperNodes, an unregistered one refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower engine needs the optional extra fedmml[flower]")

from fedmml.config import load_config
from fedmml.experiment import build_setup, read_metrics

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
    expected = reference.server.run(reference.engine.dispatch)
    for got, want in zip(records, expected, strict=True):
        assert abs(got["bytes_up"] - want["bytes_up"]) <= 32
        assert got["bytes_down"] == want["bytes_down"]
    assert traffic["inbound-bytes"] >= summary["bytes_up_total"]
    assert traffic["outbound-bytes"] >= summary["bytes_down_total"]
    assert records[1]["bytes_up"] < records[0]["bytes_up"] / 4  # stage 2 sends only the new block and heads
