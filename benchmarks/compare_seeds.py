"""Run `fedmml compare` for several seeds and print a Markdown table of the results (for RESULTS.md).

    python benchmarks/compare_seeds.py --preset emoji --seeds 0 1 2 --out runs/bench-emoji
    python benchmarks/compare_seeds.py --preset emoji --seeds 0 1 2 --out runs/bench-emoji --no-run

Each seed's comparison lands in OUT/seed-<s>/; with --no-run, finished comparisons are only summarised.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("e2e", "lw", "prog")


def _run(preset: str, seed: int, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "fedmml.cli", "compare", "--preset", preset, "--quiet", "--out", str(out)]
    cmd.append("--overwrite")  # a rerun of a seed replaces its earlier runs
    cmd += ["--set", f"run.seed={seed}", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def _fmt(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    """Run (or read) the comparisons and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="emoji")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-run", action="store_true", help="only summarise finished comparisons")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    extra = [x for o in args.overrides for x in ("--set", o)]
    walls = {}
    for seed in args.seeds:
        if not args.no_run:
            walls[seed] = _run(args.preset, seed, args.out / f"seed-{seed}", extra)
    runs = {s: json.loads((args.out / f"seed-{s}" / "comparison.json").read_text()) for s in args.seeds}
    rows = [
        "| method | rsum | i2t R@1 | t2i R@1 | zero-shot FMNIST top-1 | MB up / client-round | run wall s |"
    ]
    rows.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in METHODS:
        per = [runs[s][m] for s in args.seeds]
        up = [
            p["bytes_up_total"] / 1e6 / (p["rounds"] * _clients_per_round(args.out / f"seed-{s}" / m))
            for p, s in zip(per, args.seeds, strict=True)
        ]
        zs = [p["zeroshot_fmnist_top1"] for p in per if "zeroshot_fmnist_top1" in p]
        rows.append(
            f"| {m} | {_fmt([p['rsum'] for p in per])} | {_fmt([p['i2t_r1'] for p in per])} | "
            f"{_fmt([p['t2i_r1'] for p in per])} | {_fmt(zs) if zs else 'n/a'} | {_fmt(up)} | "
            f"{_fmt([p['wall_s'] for p in per], 0)} |"
        )
    chance = runs[args.seeds[0]]["e2e"]["chance_rsum"]
    print(f"seeds: {' '.join(map(str, args.seeds))}; chance rsum: {chance:.2f}")
    print("\n".join(rows))
    for s in args.seeds:
        r = runs[s]
        print(
            f"seed {s}: lw/e2e rsum {r['lw']['rsum'] / r['e2e']['rsum']:.3f}, prog/e2e rsum "
            f"{r['prog']['rsum'] / r['e2e']['rsum']:.3f}, e2e/lw bytes up "
            f"{r['e2e']['bytes_up_total'] / r['lw']['bytes_up_total']:.2f}x"
            + (f", compare wall {walls[s]:.0f} s" if s in walls else "")
        )


def _clients_per_round(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return statistics.mean(len(r["clients"]) for r in records)


if __name__ == "__main__":
    main()
