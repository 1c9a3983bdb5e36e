"""Start-up of Flower simulation two ways: fedmml's (a SuperLink and ``flwr run``) and Flower's Python API
(``flwr.simulation.run_simulation`` in this process), on the same short run.

.venv/bin/python benchmarks/sim_startup.py --data data/emoji --repeats 2

Prints, per way and repeat, the seconds until the first round is in metrics.jsonl and until the run ends.
The in-process way wraps the project's ServerApp so that it receives the run config that ``flwr run``
would pass.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

OVERRIDES = ["schedules.uniform.rounds=[1, 1, 0]", "eval.every=0", "run.threads=1"]


def _superlink(out: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "fedmml.cli", "run", "--engine", "flower-sim", "--preset", "tiny", "--quiet"]
    cmd += ["--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True, capture_output=True)


def _in_process(out: Path, overrides: list[str]) -> None:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedmml.engines.flower import server_app
    from fedmml.engines.flower.client_app import app as client_app

    wrapped = ServerApp()

    @wrapped.main()
    def main(grid, context) -> None:  # noqa: ANN001 - Flower's types
        context.run_config.update({"preset": "tiny", "overrides": ";".join(overrides), "run-dir": str(out)})
        server_app.main(grid, context)

    resources = {"client_resources": {"num_cpus": 1}}
    run_simulation(wrapped, client_app, num_supernodes=3, backend_config=resources)


def measure(way: str, data: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f'data.root="{data.resolve()}"', *OVERRIDES]
    started, first = time.perf_counter(), {}

    def watch() -> None:
        metrics = out / "metrics.jsonl"
        while "s" not in first:
            if metrics.exists() and metrics.stat().st_size:
                first["s"] = time.perf_counter() - started
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    (_superlink if way == "superlink" else _in_process)(out, overrides)
    total = time.perf_counter() - started
    time.sleep(0.2)
    return {"first_round_s": round(first.get("s", float("nan")), 1), "total_s": round(total, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/emoji"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for way in ("superlink", "in-process"):
                result = measure(way, args.data, Path(tmp) / f"{way}-{repeat}")
                print(json.dumps({"way": way, "repeat": repeat, **result}), flush=True)


if __name__ == "__main__":
    main()
