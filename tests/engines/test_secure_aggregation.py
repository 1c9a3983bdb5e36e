"""SecAgg+ (privacy.secure_aggregation) through the real ServerApp and ClientApp: the server gets only the
sum, which equals the plain mean within one quantisation level, with a client lost mid-protocol, and under
DP with the same privacy figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower engine needs the optional extra fedmml[flower]")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.secure_aggregation.quantization import dequantize, quantize  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedmml.config import ConfigError, load_config  # noqa: E402
from fedmml.engines.flower.client_app import app as client_app  # noqa: E402
from fedmml.engines.flower.secure import FIT_CONFIG  # noqa: E402
from fedmml.engines.flower.server_app import main  # noqa: E402
from fedmml.federation.secure import LEVELS, rounded_bound  # noqa: E402
from fedmml.runs import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow  # Flower's protocol in this process: seconds per round

OVERRIDES = ["schedules.uniform.rounds=[1, 1, 0]", "run.threads=1", 'run.engine="flower-sim"']
SECURE = "privacy.secure_aggregation=true"
DP = ["privacy.target_epsilon=8", "privacy.clip=0.5", 'privacy.clipping="adaptive"', "privacy.count_stddev=1"]


def _run(grid, emoji_root: Path, out: Path, *extra: str) -> list[dict]:
    overrides = ";".join([f'data.root="{emoji_root}"', *OVERRIDES, *extra])
    run_config = {"preset": "tiny", "overrides": overrides, "run-dir": str(out)}
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return read_metrics(out)


def _after_round_one(out: Path) -> dict:
    return load_file(str(out / "checkpoints" / "round-000001.safetensors"))


def _within_one_level(a: Path, b: Path, span: float = 1.0) -> bool:
    """Whether every weight after round 1 differs by less than one SecAgg+ level of +-``span`` (the error of a
    mean of stochastically rounded values) plus the float32 rounding of each weight."""
    x, y = _after_round_one(a), _after_round_one(b)
    assert x.keys() == y.keys()
    level = 2 * span / LEVELS
    return all(
        bool(((x[k].double() - y[k].double()).abs() < level + x[k].double().abs() * 2**-23).all()) for k in x
    )


def _fails(local_grid, stage: str):
    """A grid on which partition 1's node fails its training message ("train"), or under SecAgg+ the
    message of one stage: "setup" (before it shares its keys: nothing of it is in any mask) or "fit" (after:
    the protocol must remove its pairwise masks from the others' updates)."""

    def failing(msg: Message) -> bool:
        records = msg.content.config_records
        if stage == "fit":
            return FIT_CONFIG in records
        if stage == "setup":
            return RECORD_KEY_CONFIGS in records and records[RECORD_KEY_CONFIGS].get("stage") == "setup"
        return msg.metadata.message_type == "train"

    class Flaky(local_grid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for msg in messages:
                pid = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
                if pid == 1 and failing(msg):
                    replies.append(Message(Error(code=0, reason="out of memory"), reply_to=msg))
                else:
                    replies += super().send_and_receive([msg], timeout=timeout)
            return replies

    return Flaky(client_app, num_nodes=3)


class Recording:
    """Keeps every reply the server receives."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        self.replies += replies
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def test_the_server_gets_the_plain_mean_within_one_level_and_no_update(
    emoji_root: Path, tmp_path: Path, local_grid
) -> None:
    plain = _run(local_grid(client_app, num_nodes=3), emoji_root, tmp_path / "plain")
    grid = Recording(local_grid(client_app, num_nodes=3))
    secure = _run(grid, emoji_root, tmp_path / "secure", SECURE)
    # Each coordinate of the mean is off by less than one level of the range +-1 (privacy.secagg_range).
    assert _within_one_level(tmp_path / "plain", tmp_path / "secure")
    for n, (p, s) in enumerate(zip(plain, secure, strict=True)):
        assert s["clients"] == p["clients"] == [0, 1, 2]
        # The first round trains the same model; later ones start from a mean that Flower's quantisation
        # rounds stochastically (np.random, unseeded) to within one level, which moved round 2's loss by up
        # to 5e-4 relative across runs; a wrong mean (not divided, a client missing) moves whole updates.
        assert s["train_loss"] == pytest.approx(p["train_loss"], rel=1e-4 if n == 0 else 1e-2)
        # What the clients upload for the protocol is counted: more than the plain update (masked integers).
        assert s["bytes_up"] > p["bytes_up"]
    # Four SecAgg+ stages per round, three nodes, two rounds; no reply carries a tensor or fedmml's payload.
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train) == 24
    for reply in train:
        assert "fedmml" not in reply.content.config_records
        assert all(len(record) == 0 for record in reply.content.array_records.values())


@pytest.mark.parametrize("stage", ["setup", "fit"])
def test_a_lost_client_leaves_the_mean_of_the_others(
    emoji_root: Path, tmp_path: Path, local_grid, stage: str
) -> None:
    plain = _run(_fails(local_grid, "train"), emoji_root, tmp_path / "plain")
    secure = _run(_fails(local_grid, stage), emoji_root, tmp_path / "secure", SECURE)
    assert [r["failed_clients"] for r in secure] == [r["failed_clients"] for r in plain] == [[1], [1]]
    assert [r["clients"] for r in secure] == [[0, 2], [0, 2]]
    assert _within_one_level(tmp_path / "plain", tmp_path / "secure")


def test_dp_under_secure_aggregation_spends_and_adapts_as_without(
    emoji_root: Path, tmp_path: Path, local_grid
) -> None:
    # The clients clip (a hair under the bound, for the rounding), the unclipped bits are summed securely,
    # and the server noises the sum: the same epsilon, noise, bound and noised count as plain DP.
    plain = _run(local_grid(client_app, num_nodes=3), emoji_root, tmp_path / "plain", *DP)
    secure = _run(local_grid(client_app, num_nodes=3), emoji_root, tmp_path / "secure", *DP, SECURE)
    for p, s in zip(plain, secure, strict=True):
        assert s["privacy"]["epsilon"] == p["privacy"]["epsilon"] > 0
        assert s["privacy"]["noise_std"] == pytest.approx(p["privacy"]["noise_std"], rel=1e-12)
        assert s["privacy"]["unclipped_fraction"] == pytest.approx(
            p["privacy"]["unclipped_fraction"], rel=1e-9
        )
    # Close, not within a level: the clients clipped to a hair under the bound.
    assert _within_one_level(tmp_path / "plain", tmp_path / "secure", 1000 * 0.5)


def test_the_rounded_update_stays_within_the_bound() -> None:
    # SecAgg+ rounds each coordinate stochastically to one of LEVELS levels of +-bound: clipped to the bound
    # itself, an update often leaves it; clipped to rounded_bound, never.
    rng = np.random.default_rng(0)
    bound, dims = 0.5, 40_000
    over = 0
    for _ in range(20):
        direction = rng.standard_normal(dims)
        direction /= np.linalg.norm(direction)
        np.random.seed(int(rng.integers(2**31)))  # Flower's rounding draws from numpy's global stream
        for norm in (bound, rounded_bound(bound, dims)):
            (q,) = quantize([direction * norm], bound, LEVELS)
            (back,) = dequantize([q], bound, LEVELS)
            if norm == bound:
                over += np.linalg.norm(back) > bound
            else:
                assert np.linalg.norm(back) <= bound
    assert over > 0
    assert math.isclose(rounded_bound(bound, dims), bound * (1 - 2 * 200 / LEVELS))


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (['run.engine="inprocess"'], "runs on Flower"),
        (['federation.aggregator="median"'], "federation.aggregator"),
        (['run.method="prog"'], "neck fit"),
        (['transport.dtype="int8"'], "transport.dtype"),
        (["privacy.secagg_threshold=3"], "secagg_threshold"),
    ],
)
def test_what_secure_aggregation_cannot_go_with_is_one_line(extra: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=says) as err:
        load_config("tiny", ['run.engine="flower-sim"', SECURE, *extra])
    assert "\n" not in str(err.value)
