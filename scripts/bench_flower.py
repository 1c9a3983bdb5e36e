"""Per-round overhead of the Flower engines over the in-process engine, on the tiny preset.

.venv/bin/python scripts/bench_flower.py --data data/emoji --clients 100 --per-round 10 --rounds 3
.venv/bin/python scripts/bench_flower.py --data data/emoji --deploy --clients 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fedmml.config import load_config
from fedmml.experiment import read_metrics, run_experiment


def _run(engine: str, args: argparse.Namespace, out: Path) -> dict:
    overrides = [
        f'data.root="{args.data.resolve()}"',
        f"federation.num_clients={args.clients}",
        f"federation.clients_per_round={args.per_round}",
        f"schedules.uniform.rounds=[{args.rounds}, 0, 0]",
        "eval.every=0",
        f'run.engine="{engine}"',
    ]
    started = time.perf_counter()
    summary = run_experiment(load_config("tiny", overrides), out)
    rounds = [r["wall_s"] for r in read_metrics(out)]
    return {
        "engine": engine,
        "total_s": round(time.perf_counter() - started, 1),
        "round_s": [round(r, 2) for r in rounds],
        "median_later_round_s": round(statistics.median(rounds[1:] or rounds), 2),
        "bytes_up_total": summary["bytes_up_total"],
        "flower_traffic": summary.get("flower", {}).get("network-traffic"),
    }


def main() -> None:
    """Run the in-process engine and one Flower engine with the same settings; print JSON lines."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/emoji"))
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--deploy", action="store_true", help="loopback deployment instead of simulation")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("inprocess", "flower" if args.deploy else "flower-sim"):
            print(json.dumps(_run(engine, args, Path(tmp) / engine)), flush=True)


if __name__ == "__main__":
    main()
