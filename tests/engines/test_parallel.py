"""Several clients at once in worker processes (federation.parallel_clients): the same updates, aggregate,
figures and checkpoints as one client after another, and a dead worker costs one client, not the run.

The bound is exact equality, measured: a client's work in a worker process is the same code on the same
message, data and seeds, with the same intra-op thread count (one, tests/conftest.py), so the same kernels
add the same numbers in the same order. A GPU could differ in the last bits where its kernels add with
atomics (embedding gradients); a CPU does not.
"""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from fedmml.config import load_config
from fedmml.engines.parallel import MAX_AUTO, ParallelEngine, parallel_clients
from fedmml.events import ClientDropped, ClientStarted
from fedmml.experiment import build_setup
from fedmml.federation.payload import Message, deserialize
from fedmml.runs import read_metrics

# Timings differ between any two runs.
TIMES = {"wall_s", "eval_s", "client_s", "client_train_s", "client_data_wait_s"}


def _cfg(root: Path, preset: str, *extra: str):
    return load_config(preset, [f'data.root="{root}"', "run.threads=1", *extra])


class Replies:
    """Wraps an engine's dispatch and keeps every reply, per round, by client."""

    def __init__(self, setup) -> None:
        self.rounds: list[dict[int, Message]] = []
        self.dispatch = setup.engine.dispatch
        setup.engine.dispatch = self

    def __call__(self, outgoing):
        self.rounds.append({})
        for cid, reply in self.dispatch(outgoing):
            self.rounds[-1][cid] = reply
            yield cid, reply


def _run(cfg):
    setup = build_setup(cfg)
    replies = Replies(setup)
    metrics = setup.run_rounds()
    return setup, replies.rounds, metrics


def _figures(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMES} for m in metrics]


def _same_updates(got: list[dict[int, Message]], want: list[dict[int, Message]]) -> None:
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for mine, theirs in zip(got, want, strict=True):
        for cid, reply in theirs.items():
            assert mine[cid].meta == reply.meta  # losses, steps, FLOPs, peak memory, sample counts
            a, b = deserialize(mine[cid].blob), deserialize(reply.blob)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"client {cid}"


@pytest.mark.slow
def test_clients_at_once_make_the_updates_they_make_one_after_another(emoji_root: Path) -> None:
    # Three clients in two workers: one worker trains two clients in turn. End to end here; LW's caches,
    # kept per client inside a worker, on the emoji preset below.
    extra = ['run.method="e2e"', "schedules.uniform.rounds=[1, 2, 1]"]
    alone = _run(_cfg(emoji_root, "tiny", *extra))
    together = _run(_cfg(emoji_root, "tiny", *extra, "federation.parallel_clients=2"))
    assert isinstance(together[0].engine, ParallelEngine) and not together[0].clients
    _same_updates(together[1], alone[1])
    assert _figures(together[2]) == _figures(alone[2])
    a, b = together[0].server.model.state_dict(), alone[0].server.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_clients_at_once_on_the_emoji_preset(emoji_root: Path) -> None:
    # The default preset's real encoders (EfficientNet-Lite0, MiniLM) and LW's frozen-prefix cache, two
    # clients in each worker.
    extra = ["data.limit_train=256", "federation.num_clients=4", "federation.clients_per_round=0"]
    extra += ["schedules.uniform.rounds=[1, 1, 0, 0, 0, 0]", "eval.every=0", "eval.zeroshot=false"]
    extra += ["data.limit_test=64"]
    alone = _run(_cfg(emoji_root, "emoji", *extra))
    together = _run(_cfg(emoji_root, "emoji", *extra, "federation.parallel_clients=2"))
    _same_updates(together[1], alone[1])
    assert _figures(together[2]) == _figures(alone[2])


@pytest.mark.slow
def test_a_resumed_run_with_clients_at_once_ends_as_an_uninterrupted_one(
    emoji_root: Path, tmp_path: Path
) -> None:
    from fedmml.cli import main

    args = ["run", "--preset", "tiny", "--method", "lw", "--quiet", "--set", f'data.root="{emoji_root}"']
    args += [
        "--set",
        "run.threads=1",
        "--set",
        "run.keep_checkpoints=0",
        "--set",
        "federation.parallel_clients=2",
    ]
    args += ["--set", "schedules.uniform.rounds=[1, 2, 1]"]
    whole = tmp_path / "whole"
    assert main([*args, "--out", str(whole)]) == 0
    # Stopped after round 2, in the middle of stage 2: the workers rebuild the caches and hold the tensors
    # the ledger says they hold.
    stopped = tmp_path / "stopped"
    shutil.copytree(whole, stopped)
    (stopped / "summary.json").unlink()
    for late in (3, 4):
        (stopped / "checkpoints" / f"round-{late:06d}.safetensors").unlink()
    assert main(["run", "--resume", str(stopped), "--quiet"]) == 0
    assert _figures(read_metrics(stopped)) == _figures(read_metrics(whole))
    summary = [json.loads((run / "summary.json").read_text()) for run in (stopped, whole)]
    assert [{k: v for k, v in s.items() if k not in TIMES} for s in summary][0] == {
        k: v for k, v in summary[1].items() if k not in TIMES
    }


@pytest.mark.slow
def test_a_dead_worker_costs_its_client_and_the_run_goes_on(emoji_root: Path) -> None:
    cfg = _cfg(emoji_root, "tiny", 'run.method="lw"', "federation.parallel_clients=2")
    dropped: list[tuple[int, str]] = []
    killed: list[int] = []

    def listen(event) -> None:
        if isinstance(event, ClientDropped):
            dropped.append((event.client, event.reason))
        # Round 2's first message goes to client 0's worker: it dies before it can answer.
        if isinstance(event, ClientStarted) and event.position == 1 and len(starts) == 3 and not killed:
            worker = setup.engine.owner[event.client]
            os.kill(worker.process.pid, signal.SIGKILL)
            killed.append(event.client)
        if isinstance(event, ClientStarted):
            starts.append(event.client)

    starts: list[int] = []
    setup = build_setup(cfg, listen)
    metrics = setup.run_rounds()
    victim = killed[0]
    siblings = set(setup.engine.owner[victim].cids)  # the clients of the worker that died
    assert dropped[0][0] == victim and "worker process died" in dropped[0][1]
    # A sibling whose message was made before the restart lacks its frozen tensors in the new process.
    assert victim in metrics[1]["failed_clients"] and set(metrics[1]["failed_clients"]) <= siblings
    assert metrics[2]["clients"] == [0, 1, 2] and not metrics[2]["failed_clients"]
    # The restarted worker's clients lost what they held: their frozen tensors travelled again.
    reference = _run(_cfg(emoji_root, "tiny", 'run.method="lw"'))[2]
    assert metrics[2]["bytes_down"] > reference[2]["bytes_down"]


@pytest.mark.slow
def test_a_client_that_fails_in_its_worker_is_dropped_and_the_worker_stays(emoji_root: Path) -> None:
    cfg = _cfg(emoji_root, "tiny", 'run.method="e2e"', "federation.parallel_clients=2")
    dropped: list[str] = []
    setup = build_setup(cfg, lambda e: dropped.append(e.reason) if isinstance(e, ClientDropped) else None)
    engine = setup.engine
    try:
        engine.setup()
        garbage = Message({"method": "e2e"}, b"not a safetensors payload")
        assert list(engine.dispatch([(0, garbage), (1, garbage)])) == []
        assert len(dropped) == 2 and all(w.process.is_alive() for w in engine.workers)
    finally:
        engine.close()
    assert all(w.process is None for w in engine.workers)


def test_how_many_clients_train_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    cfg = load_config("tiny", ["federation.num_clients=10"])
    assert parallel_clients(cfg, cpu) == 1  # on a CPU the processes would share its cores
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert parallel_clients(cfg, gpu) == MAX_AUTO
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert parallel_clients(cfg, gpu) == 1
    assert parallel_clients(load_config("tiny", ["federation.parallel_clients=8"]), cpu) == 3  # 3 clients
    few = load_config("tiny", ["federation.num_clients=10", "federation.clients_per_round=2"])
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert parallel_clients(few, gpu) == 2
