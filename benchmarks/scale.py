"""What grows with a COCO-sized dataset: store build time, start-up, peak memory, and the loader's cost.

    .venv/bin/python benchmarks/scale.py synth --out /data/coco118k --train 118287 --test 5000
    .venv/bin/python benchmarks/scale.py synth --out /data/c17 --layout coco2017 --captions-only
    .venv/bin/python benchmarks/scale.py index --data /data/c17
    .venv/bin/python benchmarks/scale.py synth --out /data/hf118k --layout hf
    .venv/bin/python benchmarks/scale.py index --data /data/hf118k --set data.id_column=image_id
    .venv/bin/python benchmarks/scale.py store --data /data/coco118k
    .venv/bin/python benchmarks/scale.py run --data /data/coco118k --workers 0 1 2 --steps 12
    .venv/bin/python benchmarks/scale.py retrieval --images 5000 --captions-per-image 5

``index`` times the part of start-up a folder's format decides (reading the captions and partitioning them).
``synth`` writes a COCO-2017-shaped folder of synthetic 640x480 photographs (fedmml.data.synthetic).
``store`` times the preparation of the image store as a run's ten clients make it, each its own share.
``run`` measures ``fedmml run --preset paper-coco`` (random initialisation: offline) in a fresh process per
setting: seconds from start to the first training step, peak RSS, and steady-state training samples/s with
the real loader for each worker count, against the same steps on batches already in memory. ``retrieval``
scores val2017-sized embeddings (5,000 images x 25,000 captions): the time and the memory the evaluation adds
next to the full similarity matrix it never holds. Each prints a JSON line for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()

import torch  # noqa: E402  (after the clock: start-up time includes importing)

from fedmml.config import load_config  # noqa: E402

RANDOM_INIT = ['model.image.pretrained=""', 'model.text.pretrained=""']


class _Enough(BaseException):
    """Raised from the optimizer once the measured steps are done (a BaseException: the engine must not
    take it for a failing client)."""


def _config(data: str, method: str, workers: int, extra: list[str]):
    overrides = [
        f'data.root="{data}"',
        f'run.method="{method}"',
        f"data.workers={workers}",
        *RANDOM_INIT,
        *extra,
    ]
    return load_config("paper-coco", overrides)


def _measure(args: argparse.Namespace) -> dict:
    """One setting, in this (fresh) process: patch the optimizer's step to take the time, run, stop."""
    from fedmml.experiment import run_experiment
    from fedmml.federation import training

    times: list[float] = []
    step = torch.optim.AdamW.step

    def timed(self, *a, **k):
        out = step(self, *a, **k)
        times.append(time.perf_counter())
        if len(times) >= args.steps:
            raise _Enough
        return out

    torch.optim.AdamW.step = timed
    if args.in_memory:
        loader = training.DataLoader

        class Preloaded:
            """The first batches of the real loader, read before training: the steps without loading."""

            def __init__(self, *a, **k):
                real = loader(*a, **{**k, "num_workers": 0, "persistent_workers": False})
                self.batches = []
                for batch in real:
                    self.batches.append(batch)
                    if len(self.batches) >= args.steps:
                        break

            def __iter__(self):
                times.clear()  # the clock starts once the batches are in memory
                return iter(self.batches)

        training.DataLoader = Preloaded
    cfg = _config(args.data, args.method, args.workers, args.set)
    try:
        run_experiment(cfg, Path(args.out), overwrite=True)
    except _Enough:
        pass
    batch = cfg.federation.batch_size
    warm = max(1, args.steps // 3)  # the first steps include worker start-up and allocator growth
    steady = (args.steps - warm) * batch / (times[-1] - times[warm - 1])
    return {
        "data": args.data,
        "method": args.method,
        "workers": "in-memory" if args.in_memory else args.workers,
        "first_step_s": round(times[0] - STARTED, 1) if not args.in_memory else None,
        "samples_per_s": round(steady, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }


def _run(args: argparse.Namespace) -> None:
    settings = [["--workers", str(w)] for w in args.workers] + [["--in-memory"]]
    for setting in settings:
        cmd = [sys.executable, __file__, "measure", "--data", args.data, "--steps", str(args.steps)]
        cmd += ["--method", args.method, "--out", args.out, *setting]
        for item in args.set:
            cmd += ["--set", item]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        print(lines[-1], flush=True)


def _store(args: argparse.Namespace) -> None:
    """The ten clients of a paper-coco run open their shares, making the store (timed), then again (reused
    store)."""
    from fedmml.client_data import SharedSplit

    cfg = _config(args.data, "e2e", 0, args.set)
    for attempt in ("build", "reuse"):
        started = time.perf_counter()
        shared = SharedSplit(cfg)
        indexed = time.perf_counter() - started
        sizes = [len(shared.client(cid).dataset) for cid in range(cfg.federation.num_clients)]
        wall = time.perf_counter() - started
        print(
            json.dumps(
                {
                    "data": args.data,
                    "store": attempt,
                    "train_images": sum(sizes),
                    "index_s": round(indexed, 1),
                    "wall_s": round(wall, 1),
                    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                }
            ),
            flush=True,
        )


def _index(args: argparse.Namespace) -> None:
    """Start-up's share that depends on the folder's format: the training split's index and its partition
    over a paper-coco run's ten clients, and the test split's index (best of three; no image is opened)."""
    from fedmml.client_data import SharedSplit
    from fedmml.data.formats import format_of
    from fedmml.tasks import task_for

    cfg = _config(args.data, "e2e", 0, args.set)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        shared = SharedSplit(cfg)
        test = task_for(cfg).held_out(cfg, args.data)[1]
        times.append(time.perf_counter() - started)
    result = {
        "data": args.data,
        "format": format_of(cfg, args.data).name,
        "train_images": len(shared.index),
        "test_images": len(test),
        "index_and_partition_s": round(min(times), 2),
    }
    print(json.dumps(result), flush=True)


def _retrieval(args: argparse.Namespace) -> None:
    from fedmml.evaluation.retrieval import recall_of_embeddings

    torch.manual_seed(0)
    captions = args.images * args.captions_per_image
    images = torch.nn.functional.normalize(torch.randn(args.images, 256), dim=-1)
    # Each caption near its image, so the recalls are neither 0 nor 100.
    noise = 0.9 * torch.randn(captions, 256)
    owner = torch.arange(args.images).repeat_interleave(args.captions_per_image)  # each caption's image
    texts = torch.nn.functional.normalize(images[owner] + noise, dim=-1)
    relevant = torch.zeros(args.images, captions, dtype=torch.bool)
    relevant[owner, torch.arange(captions)] = True
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    scores = recall_of_embeddings(images, texts, relevant)
    result = {
        "images": args.images,
        "captions": captions,
        "seconds": round(time.perf_counter() - started, 2),
        "rsum": round(scores["rsum"], 2),
        "peak_rss_mib_before": round(before, 1),
        "peak_rss_mib_after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "similarity_matrix_mib": round(args.images * captions * 4 / 2**20, 1),
    }
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write a COCO-shaped folder of synthetic photographs")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train", type=int, default=118287)
    synth.add_argument("--test", type=int, default=5000)
    synth.add_argument(
        "--layout",
        choices=["coco", "coco2017", "hf"],
        default="coco",
        help="fedmml's, the official release's, or a Hugging Face dataset's Parquet files",
    )
    synth.add_argument("--captions-only", action="store_true", help="the captions files, no image")
    for name in ("store", "run", "measure", "index"):
        p = sub.add_parser(name)
        p.add_argument("--data", required=True)
        p.add_argument("--set", action="append", default=[], help="extra config override")
    retrieval = sub.add_parser("retrieval", help="retrieval scoring at val2017's size")
    retrieval.add_argument("--images", type=int, default=5000)
    retrieval.add_argument("--captions-per-image", type=int, default=5)
    run = sub.choices["run"]
    run.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    measure = sub.choices["measure"]
    measure.add_argument("--workers", type=int, default=0)
    measure.add_argument("--in-memory", action="store_true")
    for p in (run, measure):
        p.add_argument("--steps", type=int, default=12)
        p.add_argument("--method", default="e2e")
        p.add_argument("--out", default="runs/scale")
    args = parser.parse_args()
    if args.command == "synth":
        from fedmml.data.synthetic import write_folder

        write_folder(Path(args.out), args.train, args.test, layout=args.layout, images=not args.captions_only)
    elif args.command == "store":
        _store(args)
    elif args.command == "run":
        _run(args)
    elif args.command == "index":
        _index(args)
    elif args.command == "retrieval":
        _retrieval(args)
    else:
        print(json.dumps(_measure(args)), flush=True)


if __name__ == "__main__":
    main()
