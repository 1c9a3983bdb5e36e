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
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

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
    args = parser.parse_args()
    score = SCORE[args.data]
    rows = ["| method | " + " | ".join(_level(e) for e in args.epsilons) + " | median wall |"]
    rows.append("|---|" + "---:|" * (len(args.epsilons) + 1))
    points: dict[str, dict[float, list[float]]] = {}
    chance = None
    for method in args.methods:
        cells, walls = [], []
        for epsilon in args.epsilons:
            figures = []
            for seed in args.seeds:
                out = args.out / f"{method}-eps{epsilon:g}-seed{seed}"
                if not args.collect:
                    _run(args, out, method, epsilon, seed)
                if not (out / "summary.json").exists():
                    continue
                summary = json.loads((out / "summary.json").read_text())
                figures.append(summary[score])
                walls.append(summary["wall_s"])
                chance = chance if chance is not None else summary.get(CHANCE[args.data])
            points.setdefault(method, {})[epsilon] = figures
            cells.append(_cell(figures))
        wall = f"{statistics.median(walls):.0f} s" if walls else ""
        rows.append(f"| {method} | " + " | ".join(cells) + f" | {wall} |")
    print("\n".join(rows))
    plot = _plot(points, args.epsilons, score, chance, args.out)
    print(f"\n![privacy/utility]({plot})")


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
    fig, ax = plt.subplots(figsize=(6, 4))
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
    ax.legend()
    fig.tight_layout()
    path = out / "privacy_utility.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _level(epsilon: float) -> str:
    return f"epsilon {epsilon:g}" if epsilon else "no DP"


if __name__ == "__main__":
    main()
