"""FedAvg weighting and payload serialisation."""

import pytest
import torch

from fedmml.federation.aggregate import fedavg
from fedmml.federation.payload import Message, PayloadError, deserialize, serialize, validate


def test_fedavg_weights_by_sample_count() -> None:
    a = {"w": torch.tensor([0.0, 10.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([4.0, 20.0]), "n": torch.tensor(6)}
    out = fedavg([(a, 1), (b, 3)])
    assert torch.allclose(out["w"], torch.tensor([3.0, 17.5]))
    assert out["n"].dtype == torch.int64 and out["n"].item() == 5  # 0.25*2 + 0.75*6 = 5
    assert out["w"].dtype == torch.float32


def test_fedavg_equal_weights_is_the_mean_and_order_free() -> None:
    ts = [{"w": torch.randn(5)} for _ in range(4)]
    fwd = fedavg([(t, 7) for t in ts])["w"]
    rev = fedavg([(t, 7) for t in reversed(ts)])["w"]
    assert torch.allclose(fwd, torch.stack([t["w"] for t in ts]).mean(0), atol=1e-6)
    assert torch.equal(fwd, rev)


def test_fedavg_rejects_empty() -> None:
    with pytest.raises(ValueError):
        fedavg([])


def test_serialize_round_trip_and_byte_count() -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    blob = serialize(tensors)
    back = deserialize(blob)
    assert all(torch.equal(tensors[k], back[k]) for k in tensors)
    msg = Message({"round": 1}, blob)
    assert msg.nbytes == len(blob) + len(b'{"round": 1}')
    assert deserialize(b"") == {}


def test_validate_names_the_problem() -> None:
    ref = {"a": torch.zeros(2, 2)}
    validate({"a": torch.ones(2, 2)}, ref)
    with pytest.raises(PayloadError, match="missing"):
        validate({}, ref)
    with pytest.raises(PayloadError, match=r"a: got \(3,\)"):
        validate({"a": torch.zeros(3)}, ref)


def test_median_and_trimmed_mean_ignore_one_outlier() -> None:
    from fedmml.federation.aggregate import coordinate_median, trimmed_mean

    honest = [({"w": torch.tensor([1.0, 2.0])}, 10) for _ in range(4)]
    attacked = [*honest, ({"w": torch.tensor([1e6, -1e6])}, 1000)]
    assert torch.equal(coordinate_median(attacked)["w"], torch.tensor([1.0, 2.0]))
    assert torch.equal(trimmed_mean(attacked, trim=0.2)["w"], torch.tensor([1.0, 2.0]))
    assert fedavg(attacked)["w"].abs().max() > 1e5  # plain FedAvg is dragged away


def test_median_of_even_count_averages_the_middle_pair() -> None:
    from fedmml.federation.aggregate import coordinate_median

    ups = [({"w": torch.tensor([float(v)])}, 1) for v in (1, 2, 3, 10)]
    assert coordinate_median(ups)["w"].item() == 2.5
