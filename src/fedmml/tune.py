"""``fedmml tune``: each method's learning rates and schedule, chosen on the validation split.

For every method a grid — a scale on the encoders' learning rates, a scale on the heads', and the named
schedules — is trained with ``eval.split = "val"`` (the test split is never read) and scored by the task's
headline score. Each method's best point is written as a preset file, ``<out>/<method>.toml``, that
``fedmml run --preset`` and ``fedmml compare --tuned <out>`` take, next to a table of every point
(``grid.md``, ``grid.json``). Proxy settings (``--proxy key=value``) apply to the grid's runs only, so a grid
can fit a time budget; the presets keep the full setting. A proxy should keep what a learning rate acts on,
each client's optimizer steps per round: fewer clients per round does (on emoji it chose LW's full-set
point), a smaller ``data.limit_train`` does not (it chose rates that wreck the full set's run).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedmml import report
from fedmml.config import METHODS, Config, ConfigError, load_config, parse_override
from fedmml.events import Listener, MethodStarted
from fedmml.experiment import run_or_continue
from fedmml.methods import FULL_DEPTH
from fedmml.tasks import task_for


@dataclass(frozen=True)
class Point:
    """One grid point: a method on a named schedule with its learning rates scaled, and a value for each
    further setting the grid varies (``--vary``), as (dotted key, value) pairs."""

    method: str
    schedule: str
    encoder_scale: float
    head_scale: float
    vary: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        name = f"{self.method}-{self.schedule}-enc{self.encoder_scale:g}-heads{self.head_scale:g}"
        return name + "".join(f"-{key.rsplit('.', 1)[-1]}{_tag(value)}" for key, value in self.vary)

    def settings(self, cfg: Config) -> dict[str, Any]:
        """Dotted key -> value: this point's method, schedule, that schedule's scaled rates and the varied
        settings."""
        rates = cfg.schedules[self.schedule].lr
        lr = {
            group: [r * (self.head_scale if group == "heads" else self.encoder_scale) for r in values]
            for group, values in rates.items()
        }
        chosen = {"run.method": self.method, "schedule": self.schedule, f"schedules.{self.schedule}.lr": lr}
        return chosen | dict(self.vary)


def _tag(value: Any) -> str:
    """A varied value as a run's name shows it: ``0.25``, ``lw+heads``, ``drop``, ``true``."""
    if isinstance(value, list):
        return "+".join(_tag(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def axes(vary: list[str]) -> dict[str, list[Any]]:
    """``--vary KEY=VALUE`` items grouped into one axis per key, values in the order given."""
    grouped: dict[str, list[Any]] = {}
    for item in vary:
        path, value = parse_override(item)
        key = ".".join(path)
        if value in grouped.setdefault(key, []):
            raise ConfigError(f"--vary {key}={value!r} is given twice")
        grouped[key].append(value)
    return grouped


def grid(
    cfg: Config,
    methods: tuple[str, ...],
    encoder_scales: tuple[float, ...],
    head_scales: tuple[float, ...],
    schedules: tuple[str, ...],
    max_runs: int,
    vary: dict[str, list[Any]] | None = None,
    confirm: tuple[int, tuple[int, ...]] = (0, ()),
) -> list[Point]:
    """Every point, method by method (``vary``: further axes, dotted key -> values); refused before any
    training if it needs more than ``max_runs``, counting ``confirm`` = (top points, further seeds) per
    method (see :func:`tune`)."""
    top, seeds = confirm
    if top > 0 and cfg.run.seed in seeds:
        raise ConfigError(f"--confirm-seeds must leave out run.seed ({cfg.run.seed}): the grid trains on it")
    if bad := [m for m in methods if m not in METHODS]:
        raise ConfigError(f"unknown method {bad[0]!r}; valid choices: {', '.join(METHODS)}")
    unknown = [s for s in schedules if s not in cfg.schedules]
    if unknown:
        raise ConfigError(f"unknown schedule {unknown[0]!r}; the preset has: {', '.join(cfg.schedules)}")
    vary = vary or {}
    varied = [tuple(zip(vary, values, strict=True)) for values in itertools.product(*vary.values())]
    points: list[Point] = []
    for method, schedule in itertools.product(methods, schedules):
        same = [p.schedule for p in points if p.method == method]
        if method in FULL_DEPTH and any(_same_full_depth(cfg, schedule, s) for s in same):
            continue  # a full-depth method trains the same way on both: one is enough
        points += [
            Point(method, schedule, enc, heads, extra)
            for enc, heads, extra in itertools.product(encoder_scales, head_scales, varied)
        ]
    confirming = sum(min(top, sum(p.method == m for p in points)) * len(seeds) for m in methods)
    if len(points) + confirming > max_runs:
        raise ConfigError(
            f"the grid needs {len(points) + confirming} runs ({len(methods)} methods, {len(schedules)} "
            f"schedules, {len(encoder_scales)} encoder scales, {len(head_scales)} head scales"
            + "".join(f", {len(v)} values of {k}" for k, v in vary.items())
            + (f"; {confirming} to confirm the best on more seeds" if confirming else "")
            + f"), more than --max-runs {max_runs}"
        )
    return points


def _same_full_depth(cfg: Config, a: str, b: str) -> bool:
    """Whether a full-depth method (one stage: every round at the last stage's rates) trains the same on
    schedules ``a`` and ``b``."""
    sa, sb = cfg.schedules[a], cfg.schedules[b]
    last = {g: r[-1] for g, r in sa.lr.items()} == {g: r[-1] for g, r in sb.lr.items()}
    depth = {m: sum(v) for m, v in sa.blocks.items()} == {m: sum(v) for m, v in sb.blocks.items()}
    return last and depth and sum(sa.rounds) == sum(sb.rounds)


def _earlier_points(out_dir: Path, proxy: list[str]) -> list[Point]:
    """The points of the grid already recorded in ``out_dir`` (none when it holds no grid)."""
    path = out_dir / "grid.json"
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    if earlier.get("proxy", []) != proxy:
        raise ConfigError(
            f"{out_dir} holds a grid with proxy settings {earlier.get('proxy')}, not {proxy}; "
            "extend it with the same --proxy, or choose another --out"
        )
    return [_point(row) for row in earlier["points"]]


def _point(row: dict[str, Any]) -> Point:
    """The point a grid row records."""
    vary = tuple((key, value) for key, value in row.get("vary", []))
    return Point(row["method"], row["schedule"], row["encoder_scale"], row["head_scale"], vary)


def _toml(value: Any) -> str:
    """A TOML literal for a config value (strings, numbers, booleans, lists, tables of those)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a TOML basic string or number


def write_preset(path: Path, base: str, settings: dict[str, Any], comment: str) -> None:
    """A preset file: ``base`` plus dotted-key ``settings`` (loadable with ``--preset path``)."""
    base = str(Path(base).resolve()) if Path(base).suffix == ".toml" else base
    lines = [f"# {comment}", f"base = {_toml(base)}"]
    lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")


def tune(
    preset: str,
    overrides: list[str],
    proxy: list[str],
    points: list[Point],
    out_dir: Path,
    listener: Listener | None = None,
    overwrite: bool = False,
    resume: bool = False,
    confirm_top: int = 0,
    confirm_seeds: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Train every point on the validation split, write the grid table and one preset per method (its best
    point); returns ``{"points": [...], "best": {method: point}}``.

    With ``confirm_top`` > 0 each method's that many best points train again on every seed of
    ``confirm_seeds``, and the method's choice is the best mean over those seeds and the grid's own: points a
    few score apart on one seed are a draw on a small validation split (on emoji LW's single-seed choice
    scored below the preset's own rates on the test split).

    With ``resume`` points already trained in ``out_dir`` are read back (a stopped one is continued), and the
    grid table and presets cover those of earlier grids in ``out_dir`` too, with the same settings: a grid
    is extended without training any point twice."""
    cfg = load_config(preset, overrides)
    key = task_for(cfg).score_key
    score = f"val_{key}"
    rows = []
    if resume:
        earlier = {p.name: p for p in _earlier_points(out_dir, proxy)}
        points = [*earlier.values(), *(p for p in points if p.name not in earlier)]

    def train(point: Point, extra: list[str], name: str) -> dict[str, Any]:
        settings = point.settings(cfg)
        run_overrides = [*overrides, *proxy, *(f"{k}={_toml(v)}" for k, v in settings.items())]
        run_cfg = load_config(preset, [*run_overrides, 'eval.split="val"', *extra])
        if listener is not None:
            listener(MethodStarted(name))
        return run_or_continue(run_cfg, out_dir / "runs" / name, listener, overwrite, resume)

    for point in points:
        summary = train(point, [], point.name)
        rows.append(
            {
                **asdict(point),
                "run": point.name,
                score: summary[key],
                **{k: summary[k] for k in ("client_peak_mem_bytes", "client_flops_total", "bytes_up_total")},
                "wall_s": summary["wall_s"],
                # Under privacy.*: each point's own guarantee (its rounds and sampling set the noise).
                **({"epsilon": summary["privacy"]["epsilon"]} if summary.get("privacy") else {}),
            }
        )
    if confirm_top > 0 and confirm_seeds:
        for method in dict.fromkeys(row["method"] for row in rows):
            ranked = sorted((r for r in rows if r["method"] == method), key=lambda r: -r[score])
            for row in ranked[:confirm_top]:
                seeds = {str(cfg.run.seed): row[score]}
                for seed in confirm_seeds:
                    again = train(_point(row), [f"run.seed={seed}"], f"{row['run']}-seed{seed}")
                    seeds[str(seed)] = again[key]
                row["seeds"] = seeds
                row[f"{score}_mean"] = sum(seeds.values()) / len(seeds)
    best = _choose(rows, score)
    for method, row in best.items():
        point = _point(row)
        chosen = point.settings(cfg)
        # The user's own settings (data root, clients, ...) stay; the point's replace any they overlap.
        kept = {".".join(path): value for path, value in map(parse_override, overrides)}
        kept = {k: v for k, v in kept.items() if not any(k == c or k.startswith(c + ".") for c in chosen)}
        settings = kept | chosen
        if "seeds" in row:
            how = f"mean {row[f'{score}_mean']:.2f} over seeds {', '.join(row['seeds'])}"
        else:
            how = f"{row[score]:.2f}"
        comment = f"fedmml tune: {point.name}, validation {key} {how} (grid.md)"
        write_preset(out_dir / f"{method}.toml", preset, settings, comment)
    result = {"score": score, "proxy": proxy, "points": rows, "best": best}
    (out_dir / "grid.json").write_text(json.dumps(result, indent=2) + "\n")
    report.write_grid(out_dir, result)
    return result


def _choose(rows: list[dict[str, Any]], score: str) -> dict[str, dict[str, Any]]:
    """Each method's best row: by the mean over seeds among its confirmed points when it has any, else by
    the grid's score; of equal scores, the earlier point wins."""
    best: dict[str, dict[str, Any]] = {}
    confirmed = {row["method"] for row in rows if "seeds" in row}
    for row in rows:
        method = row["method"]
        key = f"{score}_mean" if method in confirmed else score
        if key not in row:
            continue
        if method not in best or row[key] > best[method][key]:
            best[method] = row
    return best
