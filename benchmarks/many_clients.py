"""What thousands of small simulated clients cost beyond their training steps: set-up and message decoding.

.venv/bin/python benchmarks/many_clients.py setup --data tuxpaint --clients 2500
.venv/bin/python benchmarks/many_clients.py rounds --clients 1392 --per-round 300 --repeats 2

``setup`` times an in-process run's set-up on a fresh image store (a temporary ``data.store_dir``): from the
shared split's metadata to every client's data open, as ``open_clients`` does it ("at once":
``SharedSplit.store_images`` for every client, then ``open_client_data`` for each) and as it was before
("client by client": ``open_client_data`` alone, each client adding a shard of its own). It prints the
seconds, the shards the store ends with and the samples opened, a line per way.

``rounds`` runs emoji LW late-heavy (``presets/tuned/emoji/lw.toml``) with ``--clients`` clients of the
whole training split, ``--per-round`` a round, 3 local epochs of batch 2, for the two rounds of stages 4 and
5 (so that clients receive frozen tensors), in a process of its own per run, pinned to one core with one
torch thread. "once per blob" is the code as it is (``Workspace.received``); "per client" swaps it for a
plain decode of every message, the code before. The ways alternate ``--repeats`` times; each prints the
sum of the clients' time over the rounds (``client_s``), the part in training steps (``client_train_s``)
and the rest.

Both need their data set prepared (``make data``; ``fedmml data prepare tuxpaint --out data/tuxpaint``).
A worker process of the image store imports this module again, hence the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESET = "src/fedmml/presets/tuned/{data}/lw.toml"


def _setup(data: str, clients: int, at_once: bool) -> dict:
    from fedmml.client_data import open_client_data, source_of
    from fedmml.config import load_config

    with tempfile.TemporaryDirectory() as store:
        cfg = load_config(
            PRESET.format(data=data),
            [
                f"federation.num_clients={clients}",
                'partition.kind="iid"',
                "data.limit_train=0",
                f'data.store_dir="{store}"',
                "run.threads=1",
            ],
        )
        start = time.perf_counter()
        shared = source_of(cfg)
        if at_once:
            shared.store_images(range(clients))
        opened = [open_client_data(cfg, cid, shared) for cid in range(clients)]
        seconds = time.perf_counter() - start
        shards = len(list(Path(store).rglob("*.json")))
    samples = sum(len(client.dataset) for client in opened)
    way = "at once" if at_once else "client by client"
    figures = {"s": round(seconds, 1), "shards": shards, "samples": samples}
    return {"data": data, "clients": clients, "way": way, **figures}


def _rounds(clients: int, per_round: int, once: bool) -> dict:
    from fedmml.config import load_config
    from fedmml.experiment import build_setup
    from fedmml.federation.client import Workspace
    from fedmml.federation.payload import unpack

    if not once:
        Workspace.received = lambda self, blob, dtypes: unpack(blob, dtypes)
    cfg = load_config(
        PRESET.format(data="emoji"),
        [
            f"federation.num_clients={clients}",
            f"federation.clients_per_round={per_round}",
            "federation.local_epochs=3",
            "federation.batch_size=2",
            "run.threads=1",
            "eval.every=0",
            "eval.zeroshot=false",
            'partition.kind="iid"',
            "data.limit_train=0",
            "schedules.late-heavy.rounds=[0, 0, 0, 1, 1, 0]",
        ],
    )
    setup = build_setup(cfg)
    metrics = setup.server.run(setup.engine)
    client_s = sum(m["client_s"] for m in metrics)
    train_s = sum(m["client_train_s"] for m in metrics)
    return {
        "way": "once per blob" if once else "per client",
        "rounds": len(metrics),
        "client_s": round(client_s, 1),
        "client_train_s": round(train_s, 1),
        "rest_s": round(client_s - train_s, 1),
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    sub = parser.add_subparsers(dest="what", required=True)
    setup = sub.add_parser("setup", help="set-up on a fresh image store, at once and client by client")
    setup.add_argument("--data", choices=["emoji", "tuxpaint"], default="tuxpaint")
    setup.add_argument("--clients", type=int, default=2500)
    setup.add_argument("--way", choices=["both", "at-once", "client-by-client"], default="both")
    rounds = sub.add_parser(
        "rounds", help="clients' time in emoji LW rounds, messages decoded once or per client"
    )
    rounds.add_argument("--clients", type=int, default=1392)
    rounds.add_argument("--per-round", type=int, default=300)
    rounds.add_argument("--repeats", type=int, default=2)
    rounds.add_argument("--cpu", type=int, default=0, help="the core each run is pinned to")
    rounds.add_argument("--way", choices=["once", "per-client"], help=argparse.SUPPRESS)  # one run (child)
    args = parser.parse_args()

    if args.what == "setup":
        ways = {"both": [True, False], "at-once": [True], "client-by-client": [False]}[args.way]
        for at_once in ways:
            print(json.dumps(_setup(args.data, args.clients, at_once)), flush=True)
    elif args.way:
        print(json.dumps(_rounds(args.clients, args.per_round, args.way == "once")), flush=True)
    else:
        # A process per run: the swapped method must not leak into the other way, and each starts cold.
        for _ in range(args.repeats):
            for way in ("per-client", "once"):
                cmd = ["taskset", "-c", str(args.cpu), sys.executable, __file__, "rounds", "--way", way]
                cmd += ["--clients", str(args.clients), "--per-round", str(args.per_round)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
