"""Lighter transport (``transport.dtype``): encode/decode error bounds, measured bytes, float32 masters."""

from pathlib import Path

import pytest
import torch

from fedmml.config import ConfigError, load_config
from fedmml.experiment import build_setup
from fedmml.federation.payload import (
    SCALE_SUFFIX,
    Message,
    PayloadError,
    decode,
    deserialize,
    encode,
    from_delta,
    pack,
    serialize,
    to_delta,
    unpack,
    upload_parts,
    validate,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(32, generator=g) * 1e-3,
        "zero": torch.zeros(5),
        "scalar": torch.tensor(0.05),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def test_float32_is_the_identity() -> None:
    tensors = _tensors()
    out = unpack(pack(tensors, "float32"))
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in tensors.items())


def test_float16_round_trip_relative_error() -> None:
    tensors = _tensors()
    wire = encode(tensors, "float16")
    assert wire["w"].dtype == torch.float16 and set(wire) == set(tensors)
    out = unpack(serialize(wire), {k: v.dtype for k, v in tensors.items()})
    for key in ("w", "b", "scalar"):
        assert out[key].dtype == torch.float32
        # float16 has an 11-bit significand: relative rounding error <= 2**-11 in the normal range, and
        # half the subnormal spacing (2**-25) below it.
        assert torch.allclose(out[key], tensors[key], rtol=2**-11, atol=2**-25), key
    assert torch.equal(out["zero"], tensors["zero"])
    assert torch.equal(out["bn.num_batches_tracked"], tensors["bn.num_batches_tracked"])
    assert out["bn.num_batches_tracked"].dtype == torch.int64


def test_int8_round_trip_error_at_most_half_a_step() -> None:
    tensors = _tensors()
    tensors["w"][3] = 0.0
    wire = encode(tensors, "int8")
    assert wire["w"].dtype == torch.int8 and wire["w" + SCALE_SUFFIX].dtype == torch.float32
    assert wire["w" + SCALE_SUFFIX].shape == (64,)  # one scale per row of a matrix
    assert "bn.num_batches_tracked" + SCALE_SUFFIX not in wire
    out = decode(deserialize(serialize(wire)), {k: v.dtype for k, v in tensors.items()})
    assert set(out) == set(tensors) and out["w"].dtype == torch.float32
    step = wire["w" + SCALE_SUFFIX].reshape(-1, 1)
    assert ((out["w"] - tensors["w"]).abs() <= step / 2 * (1 + 1e-5)).all()
    # An all-zero row: scale 0, no division by zero, exact zeros back.
    assert wire["w" + SCALE_SUFFIX][3] == 0 and torch.equal(out["w"][3], tensors["w"][3])
    assert torch.equal(out["bn.num_batches_tracked"], tensors["bn.num_batches_tracked"])


def test_int8_sends_vectors_as_float16() -> None:
    # A BatchNorm's running variances span orders of magnitude: a shared int8 scale would zero the small ones.
    running_var = torch.tensor([1e-4, 3e-2, 10.0])
    wire = encode({"bn.running_var": running_var, "b": torch.tensor(0.5)}, "int8")
    assert wire["bn.running_var"].dtype == torch.float16 and wire["b"].dtype == torch.float16
    assert "bn.running_var" + SCALE_SUFFIX not in wire
    out = decode(wire)
    assert torch.allclose(out["bn.running_var"], running_var, rtol=2**-11, atol=0)


def test_int8_outlier_row_coarsens_only_its_own_row() -> None:
    w = torch.full((4, 8), 0.01)
    w[0, 0] = 100.0
    out = unpack(pack({"w": w}, "int8"))
    assert torch.allclose(out["w"][1:], w[1:], rtol=0, atol=0.01 / 254 * 1.001)


def test_int8_scale_of_the_wrong_shape_is_left_for_validate() -> None:
    wire = {"w": torch.zeros(4, 8, dtype=torch.int8), "w" + SCALE_SUFFIX: torch.ones(3)}
    with pytest.raises(PayloadError, match="expected"):
        validate(decode(wire), {"w": torch.zeros(4, 8)})


def test_non_finite_values_survive_encoding_so_they_can_be_rejected() -> None:
    bad = {
        "w": torch.tensor([1.0, float("nan")]),
        "v": torch.tensor([float("inf"), 2.0]),
        "m": torch.tensor([[1.0, float("inf")], [2.0, 3.0]]),
    }
    for dtype in ("float16", "int8"):
        out = unpack(pack(bad, dtype))
        assert all(not torch.isfinite(out[k]).all() for k in bad), dtype
    other_row = unpack(pack(bad, "int8"))["m"][1]  # the other row keeps its own finite scale
    assert torch.allclose(other_row, torch.tensor([2.0, 3.0]), rtol=0, atol=3.0 / 254)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_small_update_survives_a_lossy_transport_as_a_delta(dtype: str) -> None:
    start = {"w": torch.full((4, 4), 3.0) + torch.arange(16.0).reshape(4, 4), "n": torch.tensor(5)}
    step = torch.full((4, 4), 1e-3)  # below float16's resolution at 3..18, and int8's at max 18 / 127
    trained = {"w": start["w"] + step, "n": torch.tensor(6)}
    as_weights = unpack(pack(trained, dtype))
    assert (as_weights["w"] - start["w"] - step).abs().max() > 5e-4  # the update is mostly lost
    back = from_delta(unpack(pack(to_delta(trained, start), dtype)), start)
    assert torch.allclose(back["w"], trained["w"], rtol=0, atol=1e-5)
    assert torch.equal(back["n"], trained["n"])  # integer buffers travel as they are


def test_from_delta_never_broadcasts_a_wrong_shape() -> None:
    base = {"w": torch.zeros(3, 4)}
    with pytest.raises(PayloadError, match="expected"):
        validate(from_delta({"w": torch.ones(4)}, base), base)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_only_lossy_replies_carry_deltas(emoji_root: Path, dtype: str) -> None:
    overrides = [f'data.root="{emoji_root}"', "data.limit_train=32", f'transport.dtype="{dtype}"']
    cfg = load_config("tiny", overrides)
    setup = build_setup(cfg)
    stage = setup.server.stages[0]
    message, _ = setup.server.message_for(0, stage, 1, setup.server.enter_stage(stage))
    reply = setup.clients[0].handle(message)
    assert reply.meta.get("delta", False) is (dtype != "float32")


def test_a_rounds_messages_pack_each_selection_of_tensors_once(
    emoji_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedmml.federation.server as server_module

    cfg = load_config("tiny", [f'data.root="{emoji_root}"', "data.limit_train=32"])
    server = build_setup(cfg).server
    stage = server.stages[-1]  # with earlier stages frozen
    trainable = server.enter_stage(stage)
    packed: list[list[str]] = []
    monkeypatch.setattr(server_module, "pack", lambda t, d: packed.append(sorted(t)) or pack(t, d))
    blobs = server.packer()
    one, frozen = server.message_for(0, stage, 1, trainable, blobs=blobs)
    two, _ = server.message_for(1, stage, 1, trainable, blobs=blobs)
    assert len(packed) == 1 and two.blob is one.blob  # two new clients: one packing
    state = server.model.state_dict()
    got = unpack(one.blob)
    assert sorted(got) == sorted(trainable + frozen) and frozen
    assert all(torch.equal(got[k], state[k]) for k in got)
    server.ledger.record(0, frozen)
    known, _ = server.message_for(0, stage, 1, trainable, blobs=blobs)
    assert sorted(unpack(known.blob)) == sorted(trainable) and len(packed) == 2


def test_decode_leaves_mismatches_for_validate() -> None:
    expected = {"w": torch.zeros(3), "n": torch.tensor(1)}
    # int8 codes without a scale and a float where an integer buffer belongs are not silently fixed.
    got = decode({"w": torch.zeros(3, dtype=torch.int8), "n": torch.tensor(1.0)}, {"w": torch.float32})
    with pytest.raises(PayloadError, match="expected"):
        validate(got, expected)
    with pytest.raises(PayloadError, match="unexpected"):
        validate(decode({**encode(expected, "int8"), "x" + SCALE_SUFFIX: torch.tensor(1.0)}), expected)


def test_unknown_transport_dtype_is_a_config_error_listing_the_choices() -> None:
    with pytest.raises(ConfigError, match="float32, float16, int8"):
        load_config("tiny", ['transport.dtype="bfloat17"'])
    with pytest.raises(PayloadError):
        encode({"w": torch.zeros(1)}, "bfloat17")


def _run(emoji_root: Path, dtype: str, *extra: str):
    cfg = load_config(
        "tiny",
        [
            f'data.root="{emoji_root}"',
            'run.method="lw"',
            "schedules.uniform.rounds=[1, 1, 1]",
            # A small slice keeps three runs fast; bytes do not depend on the data.
            "data.limit_train=64",
            "data.limit_test=32",
            "federation.num_clients=2",
            "eval.every=0",
            f'transport.dtype="{dtype}"',
            *extra,
        ],
    )
    setup = build_setup(cfg)
    return setup, setup.server.run(setup.engine)


@pytest.fixture(scope="module")
def runs(emoji_root: Path) -> dict:
    return {dtype: _run(emoji_root, dtype) for dtype in ("float32", "float16", "int8")}


def test_bytes_halve_with_float16_and_quarter_with_int8(runs) -> None:
    up = {d: sum(r["bytes_up"] for r in m) for d, (_, m) in runs.items()}
    down = {d: sum(r["bytes_down"] for r in m) for d, (_, m) in runs.items()}
    for total in (up, down):
        # Within a few % for the JSON headers, int8 scales and safetensors headers.
        assert total["float16"] / total["float32"] == pytest.approx(0.5, abs=0.03)
        assert total["int8"] / total["float32"] == pytest.approx(0.25, abs=0.04)


def test_global_model_stays_float32_and_finite(runs) -> None:
    for dtype, (setup, metrics) in runs.items():
        assert not any(r.get("skipped") or r["rejected_clients"] for r in metrics), dtype
        for key, value in setup.server.model.state_dict().items():
            if value.is_floating_point():
                assert value.dtype == torch.float32 and torch.isfinite(value).all(), (dtype, key)


class NaNClient:
    """Wraps a client and replaces its first tensor with NaN, re-encoded as the server asked."""

    def __init__(self, client) -> None:
        self.client = client
        self.describe = client.describe

    def handle(self, message: Message) -> Message:
        reply = self.client.handle(message)
        tensors = unpack(reply.blob)
        key = sorted(tensors)[0]
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        return Message(reply.meta, pack(tensors, message.meta["transport"]))


def test_nan_update_rejected_under_float16(emoji_root: Path) -> None:
    cfg = load_config(
        "tiny",
        [
            f'data.root="{emoji_root}"',
            "federation.num_clients=3",
            "data.limit_train=96",
            "data.limit_test=32",
            "schedules.uniform.rounds=[1, 0, 0]",
            "eval.every=0",
            'transport.dtype="float16"',
        ],
    )
    setup = build_setup(cfg)
    setup.clients[0] = NaNClient(setup.clients[0])
    metrics = setup.server.run(setup.engine)
    assert "non-finite" in metrics[0]["rejected_clients"]["0"]
    assert metrics[0]["clients"] == [1, 2]
    assert all(
        torch.isfinite(v).all() for v in setup.server.model.state_dict().values() if v.is_floating_point()
    )


def test_bench_upload_parts_count_wire_bytes() -> None:
    state = {"heads.image.0.weight": torch.randn(8, 4), "heads.image.1.num_batches_tracked": torch.tensor(3)}
    keys = list(state)
    f32 = upload_parts(state, keys)["heads"]
    assert f32 == 32 * 4 + 8
    assert upload_parts(state, keys, "float16")["heads"] == 32 * 2 + 8
    assert upload_parts(state, keys, "int8")["heads"] == 32 + 8 * 4 + 8  # codes + a scale per row + int64
