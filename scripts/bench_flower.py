"""Per-round overhead of the Flower engines over the in-process engine, on the tiny preset.

.venv/bin/python scripts/bench_flower.py --data data/emoji --clients 100 --per-round 10 --rounds 10
.venv/bin/python scripts/bench_flower.py --data data/emoji --deploy --clients 2 --rounds 3

A round's overhead is its wall time minus the time its clients spent in ``Client.handle`` (decoding,
training, encoding: ``client_s`` in metrics.jsonl) and minus evaluation (``eval_s``): what the engine adds
around the same client work. Simulation runs one actor (``--cpus-per-client 2`` on a 2-core machine) so that
clients run one after another on both engines and the subtraction is exact; the in-process engine uses the
same single thread per client. Deployment nodes run side by side, so there the overhead is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fedmml.config import load_config
from fedmml.experiment import run_experiment
from fedmml.runs import read_metrics
from fedmml.tasks import resolve_classes


def _overheads(run_dir: Path) -> list[float]:
    return [r["wall_s"] - r.get("eval_s", 0.0) - r["client_s"] for r in read_metrics(run_dir)]


def _run(engine: str, args: argparse.Namespace, out: Path) -> dict:
    overrides = [
        f'data.root="{args.data.resolve()}"',
        f"federation.num_clients={args.clients}",
        f"federation.clients_per_round={args.per_round}",
        f"schedules.uniform.rounds=[{args.rounds}, 0, 0]",
        "eval.every=0",
        "run.threads=1",
        f'run.engine="{engine}"',
    ]
    cfg = load_config("tiny", overrides)
    started = time.perf_counter()
    if engine == "flower-sim":
        from fedmml.engines.flower.launch import run_simulation

        summary = run_simulation(resolve_classes(cfg), out, cpus_per_client=args.cpus_per_client)
    else:
        summary = run_experiment(cfg, out)
    records = read_metrics(out)
    overhead = _overheads(out)
    later = overhead[1:] or overhead
    return {
        "engine": engine,
        "total_s": round(time.perf_counter() - started, 1),
        "round_s": [round(r["wall_s"], 2) for r in records],
        "client_s": [round(r["client_s"], 2) for r in records],
        "overhead_s": [round(o, 2) for o in overhead],
        "median_later_overhead_s": round(statistics.median(later), 3),
        "median_later_overhead_per_client_ms": round(1000 * statistics.median(later) / args.per_round, 1),
        "bytes_up_total": summary["bytes_up_total"],
        "flower_traffic": summary.get("flower", {}).get("network-traffic"),
    }


def main() -> None:
    """Run the in-process engine and one Flower engine with the same settings; print JSON lines."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/emoji"))
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--cpus-per-client", type=int, default=2, help="simulation: CPUs per actor")
    p.add_argument("--deploy", action="store_true", help="loopback deployment instead of simulation")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("inprocess", "flower" if args.deploy else "flower-sim"):
            print(json.dumps(_run(engine, args, Path(tmp) / engine)), flush=True)


if __name__ == "__main__":
    main()
