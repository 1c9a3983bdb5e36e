"""The Flower engine runs the same Server and Client: same metrics and bytes as the in-process engine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower engine needs the optional extra fedmml[flower]")


from fedmml.cli import main as cli
from fedmml.config import load_config
from fedmml.experiment import run_experiment
from fedmml.federation.client import derive_seed
from fedmml.runs import read_metrics

pytestmark = pytest.mark.slow  # Flower runtimes: minutes each; `make test-fast` skips them

# Two rounds (stage 1, then stage 2 with stage-1 tensors frozen) and one thread, so that kernels and
# therefore floats are identical in every process.
OVERRIDES = ["schedules.uniform.rounds=[1, 1, 0]", "run.threads=1"]


def _overrides(emoji_root: Path, *extra: str) -> list[str]:
    return [f'data.root="{emoji_root}"', *OVERRIDES, *extra]


@pytest.fixture(scope="module")
def inprocess(emoji_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inprocess")
    run_experiment(load_config("tiny", _overrides(emoji_root)), out)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Equal losses, scores and payload bytes, round by round."""
    ra, rb = read_metrics(a), read_metrics(b)
    assert len(ra) == len(rb) == 2
    for x, y in zip(ra, rb, strict=True):
        assert x["clients"] == y["clients"]
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6)
        assert y["rsum"] == pytest.approx(x["rsum"], abs=1e-6)
        assert y["bytes_down"] == x["bytes_down"]
        # Exactly: the one peak-memory figure a reply header carries is measured by the same client on every
        # engine (the server names it), not by whichever client a process happened to run first.
        assert y["bytes_up"] == x["bytes_up"]
        assert y["client_peak_mem_bytes"] == x["client_peak_mem_bytes"]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sb["rsum"] == pytest.approx(sa["rsum"], abs=1e-6)


def test_server_app_on_an_inprocess_grid_matches_the_inprocess_engine(
    emoji_root: Path, inprocess: Path, tmp_path: Path, local_grid
) -> None:
    from flwr.app import Context, RecordDict

    from fedmml.engines.flower.client_app import app as client_app
    from fedmml.engines.flower.codec import unpack
    from fedmml.engines.flower.server_app import main

    grid = local_grid(client_app, num_nodes=3)
    run_config = {"preset": "tiny", "overrides": ";".join(_overrides(emoji_root)), "run-dir": str(tmp_path)}
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    assert_same_run(inprocess, tmp_path)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train) == 6
    for msg in train:
        # Per-round settings travel in their own ConfigRecord; the payload is the fedmml message unchanged.
        config = msg.content.config_records["config"]
        payload = unpack(msg.content)
        assert config["round"] == payload.meta["round"] and config["method"] == "lw"
        assert config["lr-heads"] == payload.meta["stage"]["lr"]["heads"]
    # Node ids are unrelated to partitions: each message must reach the node holding its client's partition.
    for msg in train:
        meta = unpack(msg.content).meta
        pid = grid.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
        assert meta["seed"] == derive_seed(0, meta["round"], pid)
    records = read_metrics(tmp_path)
    assert all(r["flower_bytes_up"] >= r["bytes_up"] for r in records)
    # The clients' own time, reported beside Flower's records, is part of the round's wall time.
    assert all(0 < r["client_s"] < r["wall_s"] - r["eval_s"] for r in records)
    for context in grid.contexts.values():
        assert "fedmml-state" in context.state.config_records  # the frozen-tensor store lives in the node


def test_a_simulation_stores_its_clients_images_at_once_and_trains_as_the_inprocess_engine(
    emoji_root: Path, inprocess: Path, tmp_path: Path, local_grid
) -> None:
    from flwr.app import Context, RecordDict

    from fedmml.engines.flower.client_app import app as client_app
    from fedmml.engines.flower.server_app import main

    store = tmp_path / "store"
    sets = _overrides(emoji_root, 'run.engine="flower-sim"', f'data.store_dir="{store}"')
    run_config = {"preset": "tiny", "overrides": ";".join(sets), "run-dir": str(tmp_path / "run")}
    main(local_grid(client_app, num_nodes=3), Context(0, 0, {}, RecordDict(), run_config))
    assert_same_run(inprocess, tmp_path / "run")
    # The server's test split and one shard for the three clients' shares, where each client opening its own
    # would have added three.
    assert len(list(store.glob("*/*.json"))) == 2


def test_nodes_declare_their_memory_budgets_and_hetero_plans_with_them(
    emoji_root: Path, tmp_path: Path, local_grid
) -> None:
    from flwr.app import Context, RecordDict

    from fedmml.engines.flower.client_app import app as client_app
    from fedmml.engines.flower.server_app import main

    grid = local_grid(client_app, num_nodes=3)
    # Node 1 fits LW's slice (2.2 MiB from stage 2 on) but not Prog's (19 MiB); node 2 only the heads (0.45).
    budgets = {1: 11.6, 2: 1.0}
    for context in grid.contexts.values():
        pid = context.node_config["partition-id"]
        if pid in budgets:
            context.node_config["memory-mib"] = budgets[pid]
    overrides = _overrides(emoji_root, 'run.method="hetero"', "eval.every=0")
    run_config = {"preset": "tiny", "overrides": ";".join(overrides), "run-dir": str(tmp_path)}
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    plans = [r["client_plans"] for r in read_metrics(tmp_path)]
    assert plans == [{"0": "prog", "1": "heads", "2": "heads"}, {"0": "prog", "1": "lw", "2": "heads"}]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["budgets"]["client_memory_mib"] == {"0": 0.0, "1": 11.6, "2": 1.0}
    assert (
        summary["budgets"]["client_rounds_within_budget"] == summary["budgets"]["client_rounds_measured"] == 6
    )


def test_the_generated_app_and_the_repository_app_share_the_run_config(tmp_path: Path) -> None:
    import tomllib

    from fedmml.engines.flower.control import RUN_CONFIG_DEFAULTS, write_app

    # `flwr run .` uses the repository's pyproject.toml; `fedmml run --engine flower*` writes its own app.
    repo = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    generated = tomllib.loads((write_app(tmp_path) / "pyproject.toml").read_text())
    assert repo["tool"]["flwr"]["app"]["config"] == RUN_CONFIG_DEFAULTS
    assert generated["tool"]["flwr"]["app"]["config"] == RUN_CONFIG_DEFAULTS
    assert repo["tool"]["flwr"]["app"]["components"] == generated["tool"]["flwr"]["app"]["components"]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through /proc")
def test_ctrl_c_stops_the_simulation_and_resume_finishes_it_as_the_inprocess_engine(
    emoji_root: Path, inprocess: Path, tmp_path: Path
) -> None:
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    from fedmml.engines.flower.processes import processes_with

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedmml.cli", "run", "--engine", "flower-sim", "--preset", "tiny", "--quiet"]
    cmd += ["--out", str(out)]
    for item in _overrides(emoji_root):
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Every Flower and Ray process of this run has the run's Flower home in its environment.
    marker = f"FLWR_HOME={out / 'flwr'}"
    try:
        deadline = time.monotonic() + 240
        first = out / "checkpoints" / "round-000001.safetensors"
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        flower = processes_with(marker)
        assert len(flower) >= 4  # SuperLink, SuperExec, simulation runtime, Ray
        # The interrupt must land while the run is unfinished: its Flower processes are paused until it has
        # (the round left took 2.4 s, and a fast machine finished it before the signal came).
        for pid in flower:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_with(marker):  # a paused process left over would never end
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    # Gone within a bounded wait: Ray's workers exit after the process that owned them, which on a loaded
    # 2-core machine has taken over 30 s.
    settle = time.monotonic() + 90
    while processes_with(marker) and time.monotonic() < settle:
        time.sleep(0.5)
    assert processes_with(marker) == []
    assert first.exists() and not (out / "summary.json").exists()
    # What finished is kept: the resumed simulation (fresh nodes, frozen tensors sent again) ends as the
    # uninterrupted in-process run, with every output.
    assert cli(["run", "--resume", str(out), "--quiet"]) == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.safetensors", "report.md"):
        assert (out / name).is_file(), name
    assert_same_run(inprocess, out)
    assert json.loads((out / "flower.json").read_text())["status"] == "finished:completed"


def test_a_private_run_on_the_server_app_matches_the_inprocess_engine(
    emoji_root: Path, tmp_path: Path, local_grid
) -> None:
    # Client-level DP through Flower's messages: the bound travels to the ClientApp, its clipped update and
    # its word on clipping come back, and the server noises as in process (seeded noise in a simulation).
    from flwr.app import Context, RecordDict

    from fedmml.engines.flower.client_app import app as client_app
    from fedmml.engines.flower.server_app import main

    private = _overrides(emoji_root, "privacy.target_epsilon=8", "privacy.clip=0.5")
    alone = tmp_path / "inprocess"
    run_experiment(load_config("tiny", private), alone)
    grid = local_grid(client_app, num_nodes=3)
    run_config = {"preset": "tiny", "overrides": ";".join(private), "run-dir": str(tmp_path / "flower")}
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    assert_same_run(alone, tmp_path / "flower")
    spent = [[m["privacy"] for m in read_metrics(run)] for run in (alone, tmp_path / "flower")]
    assert spent[0] == spent[1] and spent[0][-1]["epsilon"] > spent[0][0]["epsilon"] > 0
