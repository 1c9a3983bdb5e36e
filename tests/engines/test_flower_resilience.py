"""The Flower ServerApp survives failing nodes and resumes a stopped run on fresh nodes."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower engine needs the optional extra fedmml[flower]")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from fedmml.engines.flower import server_app  # noqa: E402
from fedmml.engines.flower.client_app import app as client_app  # noqa: E402
from fedmml.engines.flower.server_app import main  # noqa: E402
from fedmml.runs import CHECKPOINTS, read_metrics  # noqa: E402

OVERRIDES = ["run.threads=1", "run.keep_checkpoints=0"]


def _run(grid, emoji_root: Path, run_dir: Path, rounds: str, resume: bool = False) -> None:
    overrides = ";".join([f'data.root="{emoji_root}"', f"schedules.uniform.rounds={rounds}", *OVERRIDES])
    run_config = {"preset": "tiny", "overrides": overrides, "run-dir": str(run_dir), "resume": resume}
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


def test_nodes_that_fail_or_stay_silent_are_dropped_and_the_run_completes(
    emoji_root: Path, tmp_path: Path, local_grid
) -> None:
    class FlakyGrid(local_grid):
        """Partition 1's node answers training with an error; partition 2's node never answers it."""

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg in messages:
                pid = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
                if msg.metadata.message_type == "train" and pid == 1:
                    replies.append(Message(Error(code=0, reason="out of memory"), reply_to=msg))
                elif msg.metadata.message_type != "train" or pid != 2:
                    replies += super().send_and_receive([msg], timeout=timeout)
            return replies

    _run(FlakyGrid(client_app, num_nodes=3), emoji_root, tmp_path, "[1, 1, 0]")
    records = read_metrics(tmp_path)
    assert len(records) == 2
    for record in records:
        assert record["clients"] == [0] and record["failed_clients"] == [1, 2]
        assert "train_loss" in record and record["flower_bytes_up"] > 0
    assert (tmp_path / "summary.json").is_file()


def test_a_stopped_run_resumes_from_its_checkpoint_on_fresh_nodes(
    emoji_root: Path, tmp_path: Path, local_grid
) -> None:
    # Stage 1 for one round, then stage 2 for two rounds (the stage-1 tensors frozen on the nodes).
    full = tmp_path / "full"
    _run(local_grid(client_app, num_nodes=3), emoji_root, full, "[1, 2, 0]")
    assert len(list((full / CHECKPOINTS).iterdir())) == 3
    # The same run stopped in the middle of stage 2: its last checkpoint, summary and model never got written.
    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    for name in ("summary.json", "model.safetensors", f"{CHECKPOINTS}/round-000003.safetensors"):
        (stopped / name).unlink()

    # A resumed run is a new Flower run, on nodes that start empty.
    _run(local_grid(client_app, num_nodes=3), emoji_root, stopped, "[1, 2, 0]", resume=True)
    want, got = read_metrics(full), read_metrics(stopped)
    assert [r["round"] for r in got] == [1, 2, 3]
    assert got[:2] == want[:2]
    assert got[2]["clients"] == want[2]["clients"]
    assert got[2]["train_loss"] == pytest.approx(want[2]["train_loss"], rel=1e-6)
    assert got[2]["rsum"] == pytest.approx(want[2]["rsum"], abs=1e-6)
    # Mid-stage the old nodes held the frozen stage-1 tensors; the new ones get them once more.
    assert got[2]["bytes_down"] > want[2]["bytes_down"]
    # The new nodes also fill their frozen-prefix caches again, and their replies say so (a few header bytes).
    assert got[2]["bytes_up"] == pytest.approx(want[2]["bytes_up"], abs=16 * len(want[2]["clients"]))
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["rsum"] == pytest.approx(json.loads((full / "summary.json").read_text())["rsum"], abs=1e-6)


@pytest.mark.parametrize("lost", ["unnoticed", "unavailable"])
def test_a_restarted_node_is_set_up_again_and_rejoins(
    lost: str, emoji_root: Path, tmp_path: Path, local_grid
) -> None:
    class RestartingGrid(local_grid):
        """Partition 2's node restarts after round 1: its run config and frozen tensors are gone. Either the
        restart goes unnoticed until round 2 reaches the empty node, or the node is down during round 2
        (Flower answers for it) and back, empty, before round 3."""

        trains = 0
        down = None

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                self.trains += 1
                node = next(n for n, c in self.contexts.items() if c.node_config["partition-id"] == 2)
                if self.trains == 2:
                    self.contexts[node].state = RecordDict()
                    self.down = node if lost == "unavailable" else None
            replies = []
            for msg in messages:
                if (
                    msg.metadata.message_type == "train"
                    and self.trains == 2
                    and msg.metadata.dst_node_id == self.down
                ):
                    down = Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable")
                    replies.append(Message(down, reply_to=msg))
                    continue
                try:
                    replies += super().send_and_receive([msg], timeout=timeout)
                except Exception as err:  # noqa: BLE001 - Flower turns a ClientApp's exception into a reply
                    replies.append(
                        Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
                    )
            return replies

    _run(RestartingGrid(client_app, num_nodes=3), emoji_root, tmp_path / "restart", "[1, 2, 0]")
    records = read_metrics(tmp_path / "restart")
    # Round 2 loses the node; round 3 sets it up again and sends it every frozen tensor.
    assert [r["clients"] for r in records] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert [r["failed_clients"] for r in records] == [[], [2], []]
    if lost == "unnoticed":
        _run(local_grid(client_app, num_nodes=3), emoji_root, tmp_path / "steady", "[1, 2, 0]")
        assert records[2]["bytes_down"] > read_metrics(tmp_path / "steady")[2]["bytes_down"]


def test_the_server_says_what_it_waits_for_while_a_lost_node_goes_unanswered(
    emoji_root: Path, tmp_path: Path, local_grid, monkeypatch
) -> None:
    monkeypatch.setattr(server_app, "WAIT_NOTE_S", 0.05)
    noted = threading.Event()
    lines: list[str] = []

    class Notes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            if "waiting" in lines[-1] and "training replies" in lines[-1]:
                noted.set()

    class KilledNodeGrid(local_grid):
        """Partition 1's node is killed: its training reply comes, from Flower, only once it is noticed."""

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg in messages:
                pid = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
                if msg.metadata.message_type == "train" and pid == 1:
                    # Flower answers for it after its heartbeats lapse: here, once the server has said so.
                    assert noted.wait(120), "the server waited without a word"
                    down = Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable")
                    replies.append(Message(down, reply_to=msg))
                else:
                    replies += super().send_and_receive([msg], timeout=timeout)
            return replies

    handler = Notes()
    server_app.log.addHandler(handler)
    try:
        _run(KilledNodeGrid(client_app, num_nodes=3), emoji_root, tmp_path, "[1, 0, 0]")
    finally:
        server_app.log.removeHandler(handler)
    said = next(line for line in lines if "waiting" in line and "training replies" in line)
    assert "of clients [0, 1, 2]" in said and "heartbeats" in said
    assert read_metrics(tmp_path)[0]["failed_clients"] == [1]
