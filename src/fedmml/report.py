"""Run and comparison reports: Markdown tables and PNG plots built from metrics records and summaries.

Metrics records are the lines of ``metrics.jsonl``: one per round, in order, with ``round`` counted over the
whole run, ``stage``, and ``bytes_up``/``bytes_down`` holding the bytes sent *in that round* (the plots and
stage tables add them up). Evaluated rounds also carry retrieval keys (``rsum``, ``i2t_r1``, ...) or
classification keys (``accuracy``, ``macro_f1``); which ones are present decides what is plotted and tabled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by servers and CI with no display
import matplotlib.pyplot as plt  # noqa: E402

from fedmml.comparison import COSTS  # noqa: E402

Record = Mapping[str, Any]
Line = tuple[str, Sequence[float], Sequence[float]]

# Evaluation kind -> plot panels (title, y label, keys); the first key of the first panel is the headline.
PANELS = {
    "retrieval": (("rsum", "sum of recalls (%)", ("rsum",)), ("Recall@1", "%", ("i2t_r1", "t2i_r1"))),
    "classification": (("Accuracy", "%", ("accuracy",)), ("Macro F1", "macro F1", ("macro_f1",))),
}
MB = 1e6  # decimal megabytes, as network traffic is usually quoted

_RECALL = re.compile(r"(i2t|t2i)_r(\d+)")
_PERCENT_KEYS = ("rsum", "chance_rsum", "accuracy", "macro_f1", "majority_rate")
_LABELS = {
    "chance_rsum": "rsum of a random ranking",
    "rsum_vs_chance": "rsum / chance",
    "accuracy": "accuracy (%)",
    "macro_f1": "macro F1",
    "majority_rate": "majority-class rate (%)",
    "wall_s": "wall time",
}


def plot_run(metrics: Sequence[Record], out_dir: Path) -> list[Path]:
    """Write the evaluation, cumulative-bytes and training-loss plots of one run; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = _rounds(metrics)
    paths = []
    if kind := _kind(metrics):
        panels = [(t, y, [(_label(k), *_series(metrics, k)) for k in keys]) for t, y, keys in PANELS[kind]]
        paths.append(_plot(out_dir / f"{kind}.png", panels, "round", metrics))
    cumulative = [(d, rounds, _cumulative_mb(metrics, (f"bytes_{d}",))) for d in ("up", "down")]
    paths.append(
        _plot(out_dir / "bytes.png", [("Cumulative communication", "MB", cumulative)], "round", metrics)
    )
    if any(_has(r, "train_loss") for r in metrics):
        loss = [("train", *_series(metrics, "train_loss"))]
        paths.append(_plot(out_dir / "loss.png", [("Training loss", "loss", loss)], "round", metrics))
    return paths


def write_run_report(
    run_dir: Path, config: Mapping[str, Any], summary: Mapping[str, Any], metrics: Sequence[Record]
) -> Path:
    """Write ``report.md`` (summary, per-stage table, plots under ``plots/``) into the run directory."""
    run_dir = Path(run_dir)
    plots = plot_run(metrics, run_dir / "plots")
    # Figures the task wrote itself (e.g. the classifier's confusion matrix) go with the plots.
    plots += sorted(run_dir.glob("*.png"))
    method = _find("method", summary, config, *metrics[:1]) or "run"
    preset = _find("preset", config, summary) or _find("name", config) or "custom"
    sections = [
        f"# {method} on {preset}",
        *_evaluation_note(summary),
        "## Summary\n\n" + _table(["metric", "value"], _summary_rows(summary, metrics)),
        "## Stages\n\n" + _stage_table(metrics),
        *_upload_section(metrics),
        *_privacy_section(summary),
        *_missed_section(summary),
        "## Plots\n\n" + _images(plots, run_dir),
    ]
    path = run_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path


def _privacy_section(summary: Mapping[str, Any]) -> list[str]:
    """Client-level differential privacy: the guarantee reached and the settings it rests on."""
    p = summary.get("privacy")
    sa = summary.get("secure_aggregation")
    secured = ""
    if sa:
        span = "the clipping bound" if sa["range"] == "clip" else f"{sa['range']:g}"
        secured = (
            f"Secure aggregation ({sa['protocol']}): the server learned each round's sum of updates, not "
            f"one client's; a dropped client's masks are rebuilt from {sa['threshold']} of {sa['shares']} "
            f"shares. Each coordinate travelled rounded to one of {sa['levels']:,} levels of +-{span}."
        )
    if not p:
        return [f"## Privacy\n\n{secured}"] if secured else []
    rows = [
        ["epsilon", f"{p['epsilon']:.4g} at delta {p['delta']:g}, {p['accountant'].upper()} accountant"],
        ["noised rounds", str(p["rounds"])],
        ["noise multiplier", f"{p['noise_multiplier']:.4g} (updates: {p['update_noise_multiplier']:.4g})"],
        ["clipping", f"{p['clipping']}, bound {p['clip']:.4g} (last: {p['final_clip']:.4g}){_stats(p)}"],
        ["sampling", f"{p['sampling']}, rate {p['sampling_rate']:.4g} of {p['population']} clients"],
        ["noise", p["noise_source"]],
    ]
    text = (
        "## Privacy\n\nClient-level DP-FedAvg with the noise drawn on the server (central DP): the guarantee "
        "covers every model the server sent or wrote, not the metadata a client reports beside its update "
        "(sample count, training loss).\n\n" + _table(["", ""], rows)
    )
    if secured:
        text += f"\n\n{secured}"
    if "clip_advice" in p:
        text += f"\n\nNote: {p['clip_advice']}."
    if "stopped_early" in summary:
        text += f"\n\nThe run {summary['stopped_early']}."
    return [text]


def _stats(p: Mapping[str, Any]) -> str:
    """How the BatchNorm statistics were clipped (summaries from before privacy.stats_share: as one)."""
    share = p.get("stats_share", 1.0)
    return "" if share >= 1 else f"; BatchNorm statistics apart, {share:g} of it"


def _epsilon(summaries: Iterable[Mapping[str, Any]]) -> str:
    """The largest epsilon a method's runs reached and their noise multiplier (solved for each method's own
    rounds under privacy.target_epsilon): the runs of a method differ only in their seed."""
    private = [s["privacy"] for s in summaries if s.get("privacy")]
    if not private:
        return "∞"
    return f"{max(p['epsilon'] for p in private):.3g} (σ {private[0]['noise_multiplier']:.3g})"


def _privacy_line(summaries: Iterable[Mapping[str, Any]]) -> str:
    """One sentence on the privacy settings the private runs among ``summaries`` share, or nothing."""
    p = next((s["privacy"] for s in summaries if s.get("privacy")), None)
    if not p:
        return ""
    return (
        f" Client-level DP (central): ε at δ = {p['delta']:g} ({p['accountant'].upper()} accountant), "
        f"{p['clipping']} clipping from {p['clip']:g}, {p['sampling']} sampling of rate "
        f"{p['sampling_rate']:.3g} from {p['population']} clients."
    )


def _missed_section(summary: Mapping[str, Any]) -> list[str]:
    """The clients (nodes) that missed rounds they were asked to train, and when they came back."""
    missed = summary.get("missed_rounds", {})
    if not missed:
        return []
    rows = [
        [cid, ", ".join(map(str, m["missed"])), ", ".join(map(str, m["rejoined"])) or "–"]
        for cid, m in missed.items()
    ]
    return ["## Clients that missed rounds\n\n" + _table(["client", "missed rounds", "back in round"], rows)]


def _evaluation_note(summary: Mapping[str, Any]) -> list[str]:
    """Say so when the scores come from the clients' own held-out splits, not the server's test split."""
    if summary.get("evaluation") != "federated":
        return []
    if "rsum" in summary:
        return [
            "Scores are **local-gallery recall** (federated evaluation): each client ranks its own test "
            "images against its own captions and the server averages the recalls weighted by images. A "
            "client's gallery is smaller than the whole test split, so these are not whole-split recalls."
        ]
    return [
        "Scores are from federated evaluation: each client scored the model on its own test split and the "
        "server summed their confusion matrices, which gives the exact accuracy and macro-F1 of all of them."
    ]


def plot_comparison(runs: Mapping[str, Sequence[Record]], out_dir: Path) -> list[Path]:
    """Overlay methods: headline metric vs round and vs cumulative bytes, and cumulative bytes vs round."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if kind := _kind([r for records in runs.values() for r in records]):
        title, ylabel, _ = PANELS[kind][0]
        key = _headline(kind)
        by_round = [(m, *_series(records, key)) for m, records in runs.items()]
        paths.append(_plot(out_dir / f"comparison_{key}.png", [(title, ylabel, by_round)], "round"))
        by_bytes = [(m, *_series(records, key, x=_cumulative_mb(records))) for m, records in runs.items()]
        per_byte = [(f"{title} vs bytes sent", ylabel, by_bytes)]
        paths.append(_plot(out_dir / f"comparison_{key}_vs_bytes.png", per_byte, "cumulative MB (up + down)"))
    panels = [
        (
            f"Cumulative bytes {d}",
            "MB",
            [(m, _rounds(rs), _cumulative_mb(rs, (f"bytes_{d}",))) for m, rs in runs.items()],
        )
        for d in ("up", "down")
    ]
    paths.append(_plot(out_dir / "comparison_bytes.png", panels, "round"))
    return paths


def write_comparison(
    out_dir: Path,
    combined: Mapping[str, Mapping[str, Any]],
    runs: Mapping[str, Sequence[Record]],
    preset: str,
) -> Path:
    """Write ``comparison.md`` and ``comparison.json`` from :func:`fedmml.comparison.combine`'s result.

    The table gives every score as mean ± sd over the seeds, the headline score's ratio to e2e with its 95 %
    interval, and the client's peak memory, FLOPs and bytes each way with their ratios to e2e. ``runs``
    holds one seed's metrics records per method, for the plots.
    """
    out_dir = Path(out_dir)
    plots = plot_comparison(runs, out_dir)
    means = [entry["mean"] for entry in combined.values()]
    keys = _eval_keys(means)
    seeds = sorted({seed for entry in combined.values() for seed in entry["seeds"]}, key=int)
    headline = keys[0] if keys else None
    headers = ["method", *map(_label, keys)]
    if headline:
        headers.append(f"{_label(headline)} ÷ e2e (95 % CI)")
    for key in COSTS:
        headers += [_COST_LABELS[key], "÷ e2e"]
    headers.append("wall time")
    privacy = _privacy_line(s for entry in combined.values() for s in entry["seeds"].values())
    private = bool(privacy)
    if private:
        headers.insert(1, "ε (noise multiplier)")
    rows = []
    for method, entry in combined.items():
        ratios = entry.get("vs_e2e", {})
        row = [
            method,
            *([_epsilon(entry["seeds"].values())] if private else []),
            *(_spread(k, entry) for k in keys),
        ]
        if headline:
            row.append(_interval(ratios.get(headline)))
        for key in COSTS:
            row += [_spread(key, entry), _interval(ratios.get(key), with_ci=False)]
        row.append(_fmt("wall_s", entry["mean"].get("wall_s")))
        rows.append(row)
    where = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± sd over seeds {', '.join(seeds)}"
    text = (
        f"# Comparison on {preset}\n\n{where}; every ratio is the method's figure ÷ e2e's on the same seed. "
        f"Client peak memory is the most any client needed in one round; FLOPs and bytes are run totals."
        f"{privacy}\n\n"
        f"{_table(headers, rows)}\n\n## Plots ({'seed ' + seeds[0]})\n\n{_images(plots, out_dir)}\n"
    )
    (out_dir / "comparison.json").write_text(json.dumps(combined, indent=2, default=str) + "\n")
    path = out_dir / "comparison.md"
    path.write_text(text)
    return path


def write_grid(out_dir: Path, result: Mapping[str, Any]) -> Path:
    """``grid.md``: every tuning point with its validation score and costs, each method's choice marked."""
    score = result["score"]
    varied = list(dict.fromkeys(key for p in result["points"] for key, _ in p.get("vary", [])))
    headers = ["method", "schedule", "encoder lr ×", "heads lr ×", *(f"`{key}`" for key in varied)]
    headers += [_label(score.removeprefix("val_")) + " (val)"]
    # Points confirmed on more seeds (fedmml tune --confirm-top): their mean, what the choice went by.
    confirmed = any("seeds" in p for p in result["points"])
    headers += ["mean over seeds (val)"] if confirmed else []
    private = any("epsilon" in p for p in result["points"])
    headers += ["ε"] if private else []
    headers += ["client peak memory", "client FLOPs", "bytes up", "wall time", "chosen"]
    rows = [
        [
            p["method"],
            p["schedule"],
            f"{p['encoder_scale']:g}",
            f"{p['head_scale']:g}",
            *(str(dict(p.get("vary", [])).get(key, "")) for key in varied),
            _fmt(score.removeprefix("val_"), p[score]),
            *([_seed_mean(score, p)] if confirmed else []),
            *([f"{p['epsilon']:.3g}" if "epsilon" in p else "∞"] if private else []),
            *(_fmt(k, p[k]) for k in ("client_peak_mem_bytes", "client_flops_total", "bytes_up_total")),
            _fmt("wall_s", p["wall_s"]),
            "✓" if result["best"][p["method"]]["run"] == p["run"] else "",
        ]
        for p in result["points"]
    ]
    proxy = ", ".join(f"`{item}`" for item in result["proxy"]) or "none"
    text = (
        f"# Tuning grid\n\nScored on the validation split; proxy settings for the grid runs: {proxy}. "
        f"Each method's chosen point is its preset file `<method>.toml` here.\n\n{_table(headers, rows)}\n"
    )
    path = Path(out_dir) / "grid.md"
    path.write_text(text)
    return path


def _seed_mean(score: str, point: Mapping[str, Any]) -> str:
    """``61.2 (seeds 0, 1: 60.1, 62.3)`` for a confirmed grid point; blank for the others."""
    if "seeds" not in point:
        return ""
    key = score.removeprefix("val_")
    each = ", ".join(_fmt(key, v) for v in point["seeds"].values())
    return f"{_fmt(key, point[f'{score}_mean'])} (seeds {', '.join(point['seeds'])}: {each})"


_COST_LABELS = {
    "client_peak_mem_bytes": "client peak memory",
    "client_flops_total": "client FLOPs",
    "bytes_up_total": "bytes up",
    "bytes_down_total": "bytes down",
}


def _spread(key: str, entry: Mapping[str, Any]) -> str:
    """A figure's mean over the seeds, with ``± sd`` when there are several."""
    mean = entry["mean"].get(key)
    if mean is None or len(entry["seeds"]) < 2:
        return _fmt(key, mean)
    return f"{_fmt(key, mean)} ± {_fmt(key, entry['sd'][key])}"


def _interval(ratio: Mapping[str, Any] | None, with_ci: bool = True) -> str:
    """``0.95×`` and, from two seeds on, its 95 % interval ``[0.90, 1.00]``."""
    if not ratio:
        return "—"
    text = f"{ratio['mean']:.2f}×"
    if with_ci and ratio.get("low") is not None:
        text += f" [{ratio['low']:.2f}, {ratio['high']:.2f}]"
    return text


# --- data helpers -------------------------------------------------------------------------------------------


def _has(record: Record, key: str) -> bool:
    """Whether a record carries a value for ``key`` (evaluation keys appear only on evaluated rounds)."""
    return record.get(key) is not None


def _kind(records: Sequence[Record]) -> str | None:
    """Which evaluation these records report ("retrieval" or "classification"), by their headline key."""
    return next((kind for kind in PANELS if any(_has(r, _headline(kind)) for r in records)), None)


def _headline(kind: str) -> str:
    """The key that sums up an evaluation kind: the first key of its first panel."""
    return PANELS[kind][0][2][0]


def _eval_keys(records: Sequence[Record]) -> list[str]:
    """The evaluation keys tabled for these records, headline first; none if they were never evaluated."""
    kind = _kind(records)
    return [key for _, _, keys in PANELS[kind] for key in keys] if kind else []


def _rounds(metrics: Sequence[Record]) -> list[Any]:
    """The round of every record."""
    return [r["round"] for r in metrics]


def _series(metrics: Sequence[Record], key: str, x: Sequence[float] | None = None) -> tuple[list, list]:
    """(x, value) for the records carrying ``key``; x is the round unless a per-record x is given."""
    xs = _rounds(metrics) if x is None else x
    points = [(xv, float(r[key])) for xv, r in zip(xs, metrics, strict=True) if _has(r, key)]
    return [p[0] for p in points], [p[1] for p in points]


def _cumulative_mb(
    metrics: Sequence[Record], keys: Sequence[str] = ("bytes_up", "bytes_down")
) -> list[float]:
    """Running total, in MB, of the per-round byte counts under ``keys``."""
    total, out = 0.0, []
    for record in metrics:
        total += sum(record.get(k) or 0 for k in keys)
        out.append(total / MB)
    return out


def _stages(metrics: Sequence[Record]) -> list[tuple[Any, list[Record]]]:
    """Records grouped into consecutive runs of the same stage, in order."""
    groups: list[tuple[Any, list[Record]]] = []
    for record in metrics:
        if not groups or groups[-1][0] != record.get("stage"):
            groups.append((record.get("stage"), []))
        groups[-1][1].append(record)
    return groups


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys, so nested summaries still fit a two-column table."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _pick(mapping: Mapping[str, Any], wanted: Callable[[str], bool]) -> Any:
    """First non-None value, at any depth, whose key (last dotted part) satisfies ``wanted``."""
    for key, value in _flatten(mapping).items():
        if value is not None and wanted(key.rsplit(".", 1)[-1]):
            return value
    return None


def _find(key: str, *mappings: Mapping[str, Any]) -> Any:
    """The first value stored under ``key`` at any depth of the given mappings."""
    for mapping in mappings:
        if (value := _pick(mapping, lambda leaf: leaf == key)) is not None:
            return value
    return None


def _final(summary: Mapping[str, Any], metrics: Sequence[Record], key: str) -> Any:
    """A metric from the summary, or else from the last record that evaluated it."""
    value = _find(key, summary)
    if value is None:
        value = next((r[key] for r in reversed(metrics) if _has(r, key)), None)
    return value


def _summary_bytes(summary: Mapping[str, Any], direction: str) -> float | None:
    """The summary's own byte total one way (``bytes_up``, ``bytes_up_total`` or ``total_bytes_up``)."""
    pattern = re.compile(rf"(total_)?bytes_{direction}(_total)?")
    return _pick(summary, lambda leaf: pattern.fullmatch(leaf) is not None)


def _bytes_total(summary: Mapping[str, Any], metrics: Sequence[Record], direction: str) -> float | None:
    """Total bytes one way: the summary's own total if it has one, else the sum of the per-round counts."""
    value = _summary_bytes(summary, direction)
    if value is None and metrics:
        value = sum(r.get(f"bytes_{direction}") or 0 for r in metrics)
    return value


# --- Markdown -----------------------------------------------------------------------------------------------


def _summary_rows(summary: Mapping[str, Any], metrics: Sequence[Record]) -> list[list[str]]:
    """Summary entries, metrics first, with byte totals taken from the records when the summary lacks them."""
    # One row per client does not fit a summary: the sizes become their range.
    sizes = summary.get("client_samples") or {}
    flat = _flatten({k: v for k, v in summary.items() if k != "client_samples"})
    if sizes:
        flat["samples_per_client"] = f"{min(sizes.values()):,}-{max(sizes.values()):,} ({len(sizes)} clients)"
    for direction in ("up", "down"):
        if _summary_bytes(summary, direction) is None and metrics:
            flat[f"bytes_{direction}_total"] = _bytes_total({}, metrics, direction)
    if "rsum" in flat and "chance_rsum" in flat:
        flat["rsum_vs_chance"] = _ratio(flat["rsum"], flat["chance_rsum"])
    # Lists (a confusion matrix, class names) have their own figure or file; they do not fit a table cell.
    ordered = sorted((k for k in flat if not isinstance(flat[k], list)), key=_summary_order)
    return [[_label(k), _fmt(k, flat[k])] for k in ordered]


def _summary_order(key: str) -> tuple[int, int, int]:
    """Sort key: recalls (i2t, then t2i, by K), then rsum, chance, accuracy, F1, then the rest as given."""
    leaf = key.rsplit(".", 1)[-1]
    if match := _RECALL.fullmatch(leaf):
        return 0, match[1] == "t2i", int(match[2])
    if leaf in _PERCENT_KEYS:
        return 1, _PERCENT_KEYS.index(leaf), 0
    if leaf == "rsum_vs_chance":
        return 1, len(_PERCENT_KEYS), 0
    return 2, 0, 0


def _stage_table(metrics: Sequence[Record]) -> str:
    """Per stage: its rounds, bytes each way, its last evaluation, (under memory budgets) which slice each
    client trained, and (where necks were fitted, neck_fit.enabled) how well the necks its growth rebuilt
    reproduce the previous ones."""
    keys = _eval_keys(metrics)
    fitted = any("neck_fit" in r for r in metrics)
    planned = any("client_plans" in r for r in metrics)
    headers = ["stage", "rounds", "bytes up", "bytes down", "last eval round", *map(_label, keys)]
    headers += ["client slices"] if planned else []
    headers += ["neck fit R²"] if fitted else []
    rows = []
    for stage, records in _stages(metrics):
        last = next((r for r in reversed(records) if keys and _has(r, keys[0])), {})
        row = [
            stage,
            f"{records[0]['round']}–{records[-1]['round']} ({len(records)})",
            _fmt("bytes", _bytes_total({}, records, "up")),
            _fmt("bytes", _bytes_total({}, records, "down")),
            last.get("round", "—"),
            *(_fmt(k, last.get(k)) for k in keys),
        ]
        row += [_plan(records)] if planned else []
        rows.append(row + ([_neck_fit(records)] if fitted else []))
    return _table(headers, rows)


def _plan(records: Sequence[Record]) -> str:
    """A stage's plan as counts and clients per slice, e.g. ``prog 2 (0, 3), lw 1 (1)``."""
    plan = next((r["client_plans"] for r in records if "client_plans" in r), {})
    by_slice: dict[str, list[str]] = {}
    for cid, name in plan.items():
        by_slice.setdefault(name, []).append(cid)
    return ", ".join(f"{s} {len(c)} ({', '.join(c)})" for s, c in by_slice.items()) or "—"


def _neck_fit(records: Sequence[Record]) -> str:
    fit = next((r["neck_fit"] for r in records if "neck_fit" in r), {})
    encoders = fit.get("encoders", {})
    return ", ".join(f"{m} {e['r2']:.3f}" for m, e in sorted(encoders.items())) or "—"


def _upload_section(metrics: Sequence[Record]) -> list[str]:
    """Per stage: what one client's update carries, split into encoder blocks, stems, norms + necks, heads."""
    rows = []
    for stage, records in _stages(metrics):
        parts = records[0].get("upload_parts")
        if parts:
            total = sum(parts.values()) or 1
            rows.append(
                [stage, *(_fmt("bytes", v) for v in parts.values()), f"{100 * parts['heads'] / total:.0f}%"]
            )
    if not rows:
        return []
    headers = ["stage", "encoder blocks", "stems", "norms + necks", "heads", "heads share"]
    return ["## Where a client's upload goes\n\n" + _table(headers, rows)]


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, numbers right-aligned (every column but the first)."""
    cells = [[str(c).replace("|", r"\|") for c in row] for row in [headers, *rows]]
    rule = ["---", *(["---:"] * (len(headers) - 1))]
    return "\n".join("| " + " | ".join(row) + " |" for row in [cells[0], rule, *cells[1:]])


def _images(paths: Sequence[Path], base: Path) -> str:
    """Markdown image links relative to the report's folder, so the folder can be moved or published."""
    return "\n\n".join(f"![{p.stem}]({p.relative_to(base).as_posix()})" for p in paths)


def _label(key: str) -> str:
    """Human name for a metric or summary key."""
    leaf = key.rsplit(".", 1)[-1]
    if match := _RECALL.fullmatch(leaf):
        arrow = "image→text" if match[1] == "i2t" else "text→image"
        label = f"{arrow} R@{match[2]}"
    else:
        # Units are dropped from the name because the formatted value carries them.
        label = _LABELS.get(leaf, leaf.removesuffix("_s").removesuffix("_bytes").replace("_", " "))
    return label if leaf == key else f"{key.rsplit('.', 1)[0]}: {label}"


def _fmt(key: str, value: Any) -> str:
    """Human-friendly value: bytes in MB, FLOPs with an SI prefix, percents with 2 decimals, durations."""
    leaf = key.rsplit(".", 1)[-1]
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json.dumps(value) if isinstance(value, list | tuple) else str(value)
    if "bytes" in leaf:  # memory in MiB, as allocators count; traffic in decimal MB, as networks do
        return f"{value / 2**20:,.1f} MiB" if "mem" in leaf else f"{value / MB:,.1f} MB"
    if "flops" in leaf:
        return _si(value, "FLOPs")
    if _is_percent(leaf):
        return f"{value:.2f}"
    if leaf.startswith("wall") or leaf.endswith("_s") or "time" in leaf:
        return _duration(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _is_percent(leaf: str) -> bool:
    """Whether a key holds a percentage (recalls, rsum, accuracies, zero-shot scores)."""
    return bool(_RECALL.fullmatch(leaf)) or leaf in _PERCENT_KEYS or "accuracy" in leaf or "zeroshot" in leaf


def _ratio(value: float | None, baseline: float | None) -> str:
    """``value / baseline`` as ``0.42×``, or a dash when either is missing or the baseline is zero."""
    return f"{value / baseline:.2f}×" if value is not None and baseline else "—"


def _si(value: float, unit: str) -> str:
    """A large count with an SI prefix (FLOP totals span k to P)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:g} {unit}"


def _duration(seconds: float) -> str:
    """Seconds as ``1 h 02 min 03 s``, ``2 min 03 s`` or ``12.3 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


# --- plots --------------------------------------------------------------------------------------------------


def _plot(
    path: Path, panels: Sequence[tuple[str, str, Sequence[Line]]], xlabel: str, stages: Sequence[Record] = ()
) -> Path:
    """Save side-by-side line panels (title, y label, lines) to ``path``, marking stage starts if given."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, ylabel, lines) in zip(axes[0], panels, strict=True):
        for label, xs, ys in lines:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 40 else None, markersize=3)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if xlabel == "round":
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        _mark_stages(ax, stages)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _mark_stages(ax: Any, metrics: Sequence[Record]) -> None:
    """Dashed line before each stage's first round and a "stage k" label; nothing for single-stage runs."""
    starts = [(stage, records[0]["round"]) for stage, records in _stages(metrics)]
    if len(starts) < 2:
        return
    for i, (stage, first) in enumerate(starts):
        # Halfway between rounds, so the boundary does not hide the first point of the stage.
        x = first - 0.5
        if i:
            ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        # Clipped: a stage that starts before the first plotted round must not push the layout out.
        ax.text(
            x,
            0.98,
            f" stage {stage}",
            transform=ax.get_xaxis_transform(),
            fontsize=8,
            color="grey",
            va="top",
            clip_on=True,
        )
