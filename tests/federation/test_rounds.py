"""Server and clients over real emoji images with the tiny preset: what is sent, frozen and aggregated."""

from pathlib import Path

import pytest
import torch

from fedmml.config import load_config
from fedmml.experiment import build_setup
from fedmml.federation import client as client_module
from fedmml.federation.payload import Message, deserialize
from fedmml.methods import trainable_keys


def _setup(emoji_root: Path, method: str, *extra: str):
    cfg = load_config(
        "tiny",
        [f'data.root="{emoji_root}"', f'run.method="{method}"', "schedules.uniform.rounds=[1, 2, 1]", *extra],
    )
    return build_setup(cfg)


class Recorder:
    """Takes the place of the engine's dispatch and keeps every message, plus a snapshot of the global model
    per round."""

    def __init__(self, setup) -> None:
        self.setup = setup
        self.rounds: list[dict] = []
        self.dispatch = setup.engine.dispatch
        setup.engine.dispatch = self

    def __call__(self, outgoing):
        before = {k: v.clone() for k, v in self.setup.server.model.state_dict().items()}
        outgoing = list(outgoing)  # the messages as sent (the server makes them as they are taken)
        replies = list(self.dispatch(outgoing))
        self.rounds.append({"down": outgoing, "up": replies, "before": before})
        return replies


@pytest.fixture(scope="module")
def lw_run(emoji_root: Path):
    setup = _setup(emoji_root, "lw")
    recorder = Recorder(setup)
    metrics = setup.server.run(setup.engine)
    return setup, recorder, metrics


def test_lw_uploads_exactly_the_trainable_keys(lw_run) -> None:
    setup, rec, _ = lw_run
    model, stages = setup.server.model, setup.server.stages
    stage_of_round = [s for s in stages for _ in range(s.rounds)]
    for rnd, stage in zip(rec.rounds, stage_of_round, strict=True):
        # trainable_keys depends only on the stage's new blocks and the encoder depth at that stage.
        expected = {k for k in trainable_keys(model, "lw", stage) if _present_at(k, stage)}
        for _, reply in rnd["up"]:
            assert set(deserialize(reply.blob)) == expected


def _present_at(key: str, stage) -> bool:
    parts = key.split(".")
    return not (parts[0] == "encoders" and parts[2] == "blocks" and int(parts[3]) >= stage.depth[parts[1]])


def test_lw_sends_frozen_tensors_once(lw_run) -> None:
    setup, rec, _ = lw_run
    # Rounds 2 and 3 are both in stage 2: the first carries the newly frozen stage-1 tensors, the second not.
    first, second = rec.rounds[1]["down"], rec.rounds[2]["down"]
    for (_, m1), (_, m2) in zip(first, second, strict=True):
        keys1, keys2 = set(deserialize(m1.blob)), set(deserialize(m2.blob))
        assert keys2 < keys1
        assert any(".stem." in k for k in keys1 - keys2)
        assert not any(".stem." in k for k in keys2)


def test_lw_frozen_tensors_bit_identical_across_a_stage(lw_run) -> None:
    setup, rec, _ = lw_run
    start, end = rec.rounds[1]["before"], rec.rounds[2]["before"]
    final = setup.server.model.state_dict()
    frozen = [k for k in start if ".stem." in k or ".blocks.0." in k or ".blocks.1." in k and "text" not in k]
    assert frozen
    for k in frozen:
        assert torch.equal(start[k], end[k]) and torch.equal(end[k], final[k]), k


def test_reported_bytes_equal_serialised_sizes(lw_run) -> None:
    _, rec, metrics = lw_run
    for rnd, m in zip(rec.rounds, metrics, strict=True):
        assert m["bytes_down"] == sum(len(msg.blob) + len(msg.header) for _, msg in rnd["down"])
        assert m["bytes_up"] == sum(len(msg.blob) + len(msg.header) for _, msg in rnd["up"])


def test_clients_of_a_process_hold_one_copy_of_each_frozen_value(lw_run) -> None:
    # Each client decoded its frozen tensors from its own message; kept apart, a 1,000-client simulation
    # under frozen held 100 MB per client and was killed for memory.
    setup, _, _ = lw_run
    stores = [c.store for c in setup.clients.values() if c.store]
    assert len(stores) >= 2
    shared = 0
    for key, value in stores[0].items():
        for other in stores[1:]:
            if key in other and torch.equal(other[key], value):
                assert other[key].data_ptr() == value.data_ptr(), key
                shared += 1
    assert shared >= len(stores[0])


def test_client_leaves_frozen_tensors_untouched(emoji_root: Path) -> None:
    setup = _setup(emoji_root, "lw", "model.head.dropout=0.5")
    setup.server.run(setup.engine)
    client = setup.clients[0]
    local = setup.clients[0].workspace.model.state_dict()
    for key, value in client.store.items():
        assert torch.equal(local[key], value), key


def test_lw_moves_fewer_bytes_than_e2e(emoji_root: Path) -> None:
    totals = {}
    for method in ("e2e", "lw"):
        setup = _setup(emoji_root, method)
        totals[method] = sum(m["bytes_up"] for m in setup.server.run(setup.engine))
    assert totals["lw"] < totals["e2e"] / 2


def test_a_client_without_a_step_leaves_the_round_loss_to_the_others(emoji_root: Path) -> None:
    """A client holding one sample takes no step (a batch needs two) and reports no loss: the round's loss
    is the sample-weighted mean over the clients that trained, not NaN."""
    setup = _setup(emoji_root, "lw", "schedules.uniform.rounds=[1, 0, 0]")
    dispatch = setup.engine.dispatch
    seen = []

    def one_idle(outgoing):
        for i, (cid, reply) in enumerate(dispatch(outgoing)):
            if i == 0:
                reply = Message({**reply.meta, "steps": 0, "train_loss": float("nan")}, reply.blob)
            seen.append(reply.meta)
            yield cid, reply

    setup.engine.dispatch = one_idle
    (record,) = setup.server.run(setup.engine)
    trained = seen[1:]
    samples = sum(m["num_samples"] for m in trained)
    expected = sum(m["train_loss"] * m["num_samples"] for m in trained) / samples
    assert record["train_loss"] == pytest.approx(expected, rel=1e-12)


def test_a_blob_sent_to_many_clients_is_decoded_once_and_trains_as_if_each_decoded_it(
    emoji_root: Path, monkeypatch
) -> None:
    # In process the server sends most clients of a round the very same bytes; decoding them once per client
    # took a fifth of a 1,000-client round. Shared, the decoded tensors must train exactly as own copies.
    decoded = []
    unpack = client_module.unpack
    monkeypatch.setattr(client_module, "unpack", lambda *a: decoded.append(a[0]) or unpack(*a))
    setup = _setup(emoji_root, "lw")
    rec = Recorder(setup)
    shared = setup.server.run(setup.engine)
    sent = [message.blob for rnd in rec.rounds for _, message in rnd["down"]]
    assert len(decoded) == len({id(blob) for blob in sent}) < len(sent)
    model = {k: v.clone() for k, v in setup.server.model.state_dict().items()}

    own = lambda self, blob, dtypes: unpack(blob, dtypes)  # noqa: E731 - a copy per client, as before
    monkeypatch.setattr(client_module.Workspace, "received", own)
    alone = _setup(emoji_root, "lw")
    assert [r["train_loss"] for r in alone.server.run(alone.engine)] == [r["train_loss"] for r in shared]
    for key, value in alone.server.model.state_dict().items():
        assert torch.equal(value, model[key]), key
