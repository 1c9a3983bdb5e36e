"""fedmml's Python API: what the ``fedmml`` command does, as functions (the command calls these).

Re-exported from ``fedmml``; everything not re-exported there is private and may change::

    import fedmml

    cfg = fedmml.load_config("tiny", {"data.root": "data/emoji", "run.method": "lw"})
    summary = fedmml.run(cfg, "runs/lw", callbacks=[print])
    scores = fedmml.evaluate("runs/lw", "data/emoji")

A callback is called with each of the typed events of :mod:`fedmml.events` as it happens (a stage starts, a
round is done with its record and scores, a client is dropped, ...), in the process that runs the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedmml.config import METHODS, Config, ConfigError
from fedmml.config import load_config as _load_config
from fedmml.events import Event, Listener

Callback = Callable[[Event], None]
DEFAULT_PRESET = "emoji"
PAPER_METHODS = ("e2e", "lw", "prog")  # FedMML, LW-FedMML, Prog-FedMML


def load_config(preset: str = DEFAULT_PRESET, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """The validated config of ``preset`` (a name, see ``fedmml config --help``, or a .toml path) with
    ``overrides``: ``["key=value", ...]`` as ``--set`` takes them, or ``{"dotted.key": value, ...}``. A wrong
    key or value raises :class:`~fedmml.config.ConfigError` with one line saying why."""
    return _load_config(preset, overrides)


def _listener(callbacks: Callback | Iterable[Callback] | None) -> Listener | None:
    """One listener that calls every callback in turn."""
    if callbacks is None:
        return None
    if callable(callbacks):
        return callbacks
    every = list(callbacks)

    def call_all(event: Event) -> None:
        for callback in every:
            callback(event)

    return call_all if every else None


def run(
    cfg: Config,
    out_dir: str | Path,
    callbacks: Callback | Iterable[Callback] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``cfg``'s method on its engine (``run.engine``) and write the run folder ``out_dir``
    (config.json, metrics.jsonl, checkpoints, model.safetensors, summary.json, report.md, plots); the
    summary. A folder that holds a run is refused unless ``overwrite``; one being written by another process
    always is."""
    from fedmml.experiment import run_experiment

    return run_experiment(cfg, Path(out_dir), _listener(callbacks), overwrite=overwrite)


def resume(
    run_dir: str | Path,
    callbacks: Callback | Iterable[Callback] | None = None,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Continue the stopped run in ``run_dir`` from its newest readable checkpoint, as its config.json says;
    the summary. A finished run is read back, unchanged. Training data that changed since the run started is
    refused unless ``allow_data_change``."""
    from fedmml.experiment import resume_experiment

    finished = Path(run_dir) / "summary.json"
    if finished.is_file():
        return json.loads(finished.read_text())
    return resume_experiment(Path(run_dir), _listener(callbacks), allow_data_change)


def compare(
    cfg: Config,
    out_dir: str | Path,
    methods: Sequence[str] = PAPER_METHODS,
    seeds: Sequence[int] = (),
    callbacks: Callback | Iterable[Callback] | None = None,
    tuned: Mapping[str, Config] | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> dict[str, dict[str, Any]]:
    """Every method in ``methods`` on every seed in ``seeds`` (default: the config's) with the same round
    budget, each run in ``out_dir/<method>`` (``out_dir/seed-<s>/<method>`` for several seeds), and
    comparison.md/.json with plots; per method the mean, spread and ratio to e2e of each figure. A method in
    ``tuned`` runs from its own config. ``resume`` reads finished runs back and continues a stopped one."""
    from fedmml.experiment import compare as compare_methods

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; valid choices: {', '.join(METHODS)}")
    return compare_methods(
        cfg,
        Path(out_dir),
        tuple(methods),
        _listener(callbacks),
        overwrite=overwrite,
        seeds=tuple(seeds),
        tuned=dict(tuned or {}),
        resume=resume,
    )


def evaluate(run_dir: str | Path, data_root: str | Path, split: str = "test") -> dict[str, Any]:
    """The task's scores of the model saved in ``run_dir`` on split ``split`` of the dataset ``data_root``
    (of the run's task: COCO captions layout for image-text, ADVANCE for image-audio), with the number of
    samples scored and the entries skipped."""
    from fedmml.data.formats import detect_format
    from fedmml.device import select_device
    from fedmml.runs import load_run_model
    from fedmml.setup import evaluate_on
    from fedmml.tasks import task_for

    run_dir, data_root = Path(run_dir), Path(data_root)
    cfg, model = load_run_model(run_dir)
    found = detect_format(data_root)
    if found is not None and found.task != cfg.model.task:
        raise ConfigError(
            f"{data_root} holds {found.task} data ({found.describe}), but the run in {run_dir} is an "
            f"{cfg.model.task} model: give it a folder of its own task"
        )
    model = model.to(select_device(cfg.run.device))
    cfg.data.root = str(data_root)
    data = task_for(cfg).load_split(cfg, split, train=False)
    scores = evaluate_on(model, data, cfg)
    return {**scores, "images": len(data), "skipped": data.skipped}
