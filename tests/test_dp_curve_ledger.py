"""benchmarks/dp_curve.py's ledger: points outlive their run folders, one per run, read back by regime."""

import argparse
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dp_curve.py"
spec = importlib.util.spec_from_file_location("dp_curve", SCRIPT)
dp_curve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dp_curve)


def _args(**over) -> argparse.Namespace:
    base = dict(data="tuxpaint", clients=2500, rate=0.4, local_epochs=3, batch=2, variant="")
    base.update(methods=["frozen", "lw"], epsilons=[0.0, 8.0])
    return argparse.Namespace(**{**base, **over})


def _point(args: argparse.Namespace, method: str, epsilon: float, seed: int, score: float) -> dict:
    return {
        **dp_curve._regime(args),
        "method": method,
        "variant": args.variant,
        "epsilon": epsilon,
        "seed": seed,
        "score": score,
        "chance": 21.3,
        "wall_s": 100.0 * (seed + 1),
    }


def test_a_rerun_point_replaces_its_old_line_and_other_regimes_stay_in_the_file(tmp_path: Path) -> None:
    ledger = tmp_path / "points.jsonl"
    args, emoji = _args(), _args(data="emoji", clients=1392, rate=0.72)
    dp_curve._merge_ledger(ledger, [_point(args, "lw", 8.0, 0, 40.0), _point(emoji, "lw", 8.0, 0, 8.4)], {})
    mine = dp_curve._merge_ledger(ledger, [_point(args, "lw", 8.0, 0, 45.7)], dp_curve._regime(args))
    assert [p["score"] for p in mine] == [45.7]  # replaced, and the emoji point left out
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert sorted(p["score"] for p in lines) == [8.4, 45.7]


def test_the_table_takes_the_ledgers_seeds_and_variants_and_says_what_was_not_run(tmp_path: Path) -> None:
    args = _args()
    points = [_point(args, "lw", 8.0, s, v) for s, v in [(2, 37.4), (0, 45.7), (1, 44.6)]]
    points.append(_point(_args(variant="x4"), "lw", 0.0, 0, 41.0))
    rows, plotted, chance = dp_curve._table(points, args)
    assert rows[2] == "| frozen | not run | not run |  |"
    assert rows[3] == "| lw | not run | 42.6 (45.7, 44.6, 37.4) | 200 s |"
    assert rows[4] == "| lw (x4) | 41.0 | not run | 100 s |"
    assert plotted["lw"][8.0] == [45.7, 44.6, 37.4] and chance == 21.3
