"""Run an experiment on Flower's simulation runtime or on a local deployment, from ``fedmml run``.

The run directory receives what the in-process engine writes (written by the ServerApp), plus
``flwr/`` (Flower's home, logs and database for this run) and ``flower.json`` (Flower's record of the run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedmml.config import Config
from fedmml.engines.flower import control
from fedmml.engines.flower.processes import ProcessGroup, flower_env, free_port, tool, wait_for_port
from fedmml.events import Listener
from fedmml.tasks import task_for

CONNECTION = "fedmml"


class RunFailed(control.FlowerError):
    """Flower reports the run as finished but not completed."""


def total_rounds(cfg: Config) -> int:
    """Rounds of the run (every method spends the schedule's round budget)."""
    return sum(cfg.active_schedule.rounds)


def prepare(cfg: Config, out_dir: Path) -> tuple[Path, Path, dict[str, str]]:
    """Config.json in the (claimed) run directory, Flower's home and environment; returns (out_dir, home,
    env)."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(cfg.to_json())
    home = out_dir / "flwr"
    return out_dir, home, flower_env(home)


def start_superlink(procs: ProcessGroup, home: Path, extra: list[str]) -> int:
    """A SuperLink on a free loopback port; returns the port once it listens."""
    port = free_port()
    argv = [tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--database"]
    argv += [str(home / "superlink.db"), "--disable-runtime-dependency-installation", *extra]
    proc = procs.start("superlink", argv)
    wait_for_port(port, 60, proc)
    return port


def follow_run(
    cfg: Config,
    out_dir: Path,
    home: Path,
    env: dict[str, str],
    listener: Listener | None,
    federation_config: str = "",
    timeout: float = 3600,
    resume: bool = False,
) -> dict[str, Any]:
    """Submit the app, wait for Flower's verdict and return the run's summary with Flower's record added.

    With ``resume`` the ServerApp continues from the newest checkpoint in ``out_dir``.
    """
    app_dir = control.write_app(home / "app")
    run_config = {"config-file": str(out_dir / "config.json"), "run-dir": str(out_dir), "resume": resume}
    started = time.perf_counter()
    run_id = control.submit(app_dir, CONNECTION, env, run_config, federation_config)
    describe = task_for(cfg).describe_scores
    follower = control.MetricsFollower(out_dir / "metrics.jsonl", total_rounds(cfg), listener, describe)
    info = control.wait_for_run(run_id, CONNECTION, env, timeout, tick=follower)
    control.save_log(run_id, CONNECTION, env, out_dir / "flower.log")
    record = {"run-id": run_id, "wall_s": time.perf_counter() - started, **info}
    (out_dir / "flower.json").write_text(json.dumps(record, indent=2))
    if info.get("status") != "finished:completed":
        raise RunFailed(f"Flower run {run_id} ended as {info.get('status')}; see {out_dir / 'flower.log'}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["flower"] = record
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_simulation(
    cfg: Config,
    out_dir: Path,
    listener: Listener | None = None,
    cpus_per_client: int = 1,
    resume: bool = False,
) -> dict[str, Any]:
    """The experiment on Flower's simulation runtime (Ray), one simulated SuperNode per client."""
    out_dir, home, env = prepare(cfg, out_dir)
    with ProcessGroup(home / "logs", env) as procs:
        port = start_superlink(procs, home, ["--insecure", "--simulation"])
        control.write_connection(home, CONNECTION, f"127.0.0.1:{port}", None)
        federation = (
            f"num-supernodes={cfg.federation.num_clients} client-resources-num-cpus={cpus_per_client}"
        )
        return follow_run(cfg, out_dir, home, env, listener, federation, resume=resume)
