"""The privacy/utility curve: each method's tuned preset with and without client-level DP, many small clients.

.venv/bin/python benchmarks/dp_curve.py --out /tmp/dpcurve --methods frozen lw e2e prog --epsilons 0 8 4 1 \
    --seeds 0 --cpu 1

About 1,000 clients a round, the regime where client-level DP lets Tux Paint learn (2,500 clients of 2
samples, Poisson rate 0.4; adaptive clipping from near the norm of the weights' change: 4 for frozen and LW,
16 for e2e):

.venv/bin/python benchmarks/dp_curve.py --data tuxpaint --out /tmp/dp1000 --methods frozen lw \
    --clients 2500 --rate 0.4 --batch 2 --clip 4 --set 'partition.kind="iid"' --cpu 0

Every run is ``fedmml run`` on ``presets/tuned/<data>/<method>.toml`` over all its training data, with
``--clients`` clients, Poisson sampling at ``--rate``, ``--local-epochs`` local epochs and batch ``--batch``,
and any ``--set`` overrides; epsilon 0 means no DP, any other is privacy.target_epsilon (delta 1e-5,
adaptive clipping from ``--clip``). A run whose summary.json exists is not run again, so the sweep can be
stopped and continued. Runs go one after another, pinned to ``--cpu`` with one torch thread (``taskset``).
Prints a markdown table: rsum (or accuracy) per method and epsilon, the mean over seeds and each seed's
figure, and the median wall time; and draws the curve, a line per method against epsilon with the random
ranking (or majority class) beneath, in ``<out>/privacy_utility.png``. ``--collect`` runs nothing and
tabulates what is in ``--out`` (a point not run says so), to read a sweep that is still going.

A sweep of 2-hour runs outlives the machine that ran its first points. ``--ledger FILE`` keeps each finished
run's point (its score, wall time, client peak and privacy figures, with the regime: data, clients, rate,
local epochs, batch) as a JSON line, and the table and plot take the ledger's points of the same regime that
``--out`` lacks: the repository's ``benchmarks/dp_curve_points.jsonl`` holds the curves measured so far
(points whose folders were lost before the ledger existed carry their RESULTS figures and say so in
``source``). ``--variant NAME`` names the ``--set`` overrides (e2e at Prog's rates: ``x4``), so that they
draw a line of their own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCORE = {"emoji": "rsum", "tuxpaint": "accuracy"}
CHANCE = {"emoji": "chance_rsum", "tuxpaint": "majority_rate"}  # the floor each score is read against
CHANCE_LABEL = {"rsum": "random ranking", "accuracy": "majority class"}


def _run(args: argparse.Namespace, out: Path, method: str, epsilon: float, seed: int) -> None:
    if (out / "summary.json").exists():
        return
    preset = Path(__file__).resolve().parents[1] / "src/fedmml/presets/tuned" / args.data / f"{method}.toml"
    sets = [
        "data.limit_train=0",  # every training sample: the tuned Tux Paint presets were tuned on 1,000
        f"federation.num_clients={args.clients}",
        f"federation.clients_per_round={round(args.rate * args.clients)}",
        f"federation.local_epochs={args.local_epochs}",
        f"federation.batch_size={args.batch}",
        f"run.seed={seed}",
        "run.threads=1",
        "eval.every=0",
        "eval.zeroshot=false",
    ]
    sets += args.set
    if epsilon:
        sets += [f"privacy.target_epsilon={epsilon:g}", f"privacy.clip={args.clip:g}"]
        sets.append('privacy.clipping="adaptive"')
    cmd = ["taskset", "-c", str(args.cpu), sys.executable, "-m", "fedmml.cli", "run", "--preset", str(preset)]
    cmd += ["--quiet", "--overwrite", "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    print(f"{out.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", choices=sorted(SCORE), default="emoji")
    parser.add_argument("--methods", nargs="+", default=["frozen", "lw", "e2e", "prog"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[0, 8, 4, 1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--clip", type=float, default=0.1)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a further override for every run"
    )
    parser.add_argument(
        "--collect", action="store_true", help="run nothing: tabulate and plot the runs already in --out"
    )
    parser.add_argument(
        "--variant", default="", help="a name for the --set overrides, in the ledger and legend"
    )
    parser.add_argument("--ledger", type=Path, help="a JSON-lines file of points: written and read")
    args = parser.parse_args()
    found = []
    for method in args.methods:
        for epsilon in args.epsilons:
            for seed in args.seeds:
                out = args.out / f"{method}-eps{epsilon:g}-seed{seed}"
                if not args.collect:
                    _run(args, out, method, epsilon, seed)
                if (out / "summary.json").exists():
                    found.append(_point(args, method, epsilon, seed, out / "summary.json"))
    if args.ledger:
        found = _merge_ledger(args.ledger, found, _regime(args))
    rows, points, chance = _table(found, args)
    print("\n".join(rows))
    plot = _plot(points, args.epsilons, SCORE[args.data], chance, args.out)
    print(f"\n![privacy/utility]({plot})")


# What makes two points comparable: the data and the federation they trained in (options of these names).
REGIME = ("data", "clients", "rate", "local_epochs", "batch")


def _regime(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in REGIME}


def _point(args: argparse.Namespace, method: str, epsilon: float, seed: int, path: Path) -> dict[str, Any]:
    summary = json.loads(path.read_text())
    summary_time = path.stat().st_mtime
    privacy = summary.get("privacy") or {}
    return {
        **_regime(args),
        "method": method,
        "variant": args.variant,
        "epsilon": epsilon,
        "seed": seed,
        "score": summary[SCORE[args.data]],
        "chance": summary.get(CHANCE[args.data]),
        "macro_f1": summary.get("macro_f1"),
        "wall_s": summary["wall_s"],
        "client_peak_mem_bytes": summary["client_peak_mem_bytes"],
        "noise_multiplier": privacy.get("noise_multiplier"),
        "final_clip": privacy.get("final_clip"),
        "source": f"run of {time.strftime('%Y-%m-%d', time.gmtime(summary_time))}",
    }


def _key(point: dict[str, Any]) -> tuple:
    """The run a point is of: a rerun's point replaces the old one."""
    return tuple(point[k] for k in (*REGIME, "method", "variant", "epsilon", "seed"))


def _merge_ledger(ledger: Path, found: list[dict[str, Any]], regime: dict[str, Any]) -> list[dict[str, Any]]:
    """Write ``found`` into ``ledger`` (a point of the same run replaced) and return every point of ``regime``
    there, the new ones included."""
    kept = (
        [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
        if ledger.exists()
        else []
    )
    fresh = {_key(p) for p in found}
    kept = sorted([p for p in kept if _key(p) not in fresh] + found, key=_key)
    ledger.write_text("".join(json.dumps(p) + "\n" for p in kept))
    return [p for p in kept if all(p[k] == v for k, v in regime.items())]


def _table(
    found: list[dict[str, Any]], args: argparse.Namespace
) -> tuple[list[str], dict[str, dict[float, list[float]]], float | None]:
    """The markdown table and the plot's points: a row per method and variant of ``--methods``, a column per
    epsilon of ``--epsilons``, each cell the mean over seeds and each seed's figure."""
    rows = ["| method | " + " | ".join(_level(e) for e in args.epsilons) + " | median wall |"]
    rows.append("|---|" + "---:|" * (len(args.epsilons) + 1))
    points: dict[str, dict[float, list[float]]] = {}
    chance = next((p["chance"] for p in found if p.get("chance") is not None), None)
    lines = {(p["method"], p["variant"]) for p in found if p["method"] in args.methods}
    lines |= {(method, args.variant) for method in args.methods}  # a line not run yet says so
    for method, variant in sorted(lines, key=lambda line: (args.methods.index(line[0]), line[1])):
        label = f"{method} ({variant})" if variant else method
        mine = [p for p in found if (p["method"], p["variant"]) == (method, variant)]
        cells = []
        for epsilon in args.epsilons:
            figures = [p["score"] for p in sorted(mine, key=lambda p: p["seed"]) if p["epsilon"] == epsilon]
            points.setdefault(label, {})[epsilon] = figures
            cells.append(_cell(figures))
        walls = [p["wall_s"] for p in mine if p.get("wall_s")]
        wall = f"{statistics.median(walls):.0f} s" if walls else ""
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {wall} |")
    return rows, points, chance


def _cell(figures: list[float]) -> str:
    if not figures:
        return "not run"
    mean = f"{statistics.mean(figures):.1f}"
    return f"{mean} ({', '.join(f'{f:.1f}' for f in figures)})" if len(figures) > 1 else mean


def _plot(
    points: dict[str, dict[float, list[float]]],
    epsilons: list[float],
    score: str,
    chance: float | None,
    out: Path,
) -> Path:
    """Score against epsilon: a line per method through its seeds' means, a dot per seed, no DP last."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    order = sorted(epsilons, key=lambda e: (e == 0, e))  # the strongest privacy first, no DP last
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for method, by_epsilon in points.items():
        xs = [i for i, e in enumerate(order) if by_epsilon.get(e)]
        if not xs:
            continue
        line = ax.plot(xs, [statistics.mean(by_epsilon[order[i]]) for i in xs], marker="o", label=method)
        for i in xs:
            seeds = by_epsilon[order[i]]
            ax.scatter([i] * len(seeds), seeds, s=12, color=line[0].get_color(), alpha=0.5)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=CHANCE_LABEL[score])
    ax.set_xticks(range(len(order)), [_level(e) for e in order])
    ax.set_ylabel(f"{score} (%)" if score == "accuracy" else score)
    ax.set_title("Privacy/utility: client-level DP at each epsilon")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the points, not on them
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)  # a --collect from the ledger alone names a new folder
    path = out / "privacy_utility.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _level(epsilon: float) -> str:
    return f"epsilon {epsilon:g}" if epsilon else "no DP"


if __name__ == "__main__":
    main()
