"""The aisfx CNN backend: equality with the package's embedding network, growth, weights, layout."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from fedmml.models.backends import build_encoder

aisfx = pytest.importorskip("aisfx", reason="aisfx is installed separately: pip install --no-deps aisfx")

WIDTHS = [128, 128, 256, 256, 512, 512]


def aisfx_cfg(**kw) -> types.SimpleNamespace:
    """Stand-in for fedmml.config.EncoderConfig (the aisfx audio encoder)."""
    base = {"backend": "aisfx", "pretrained": "package", "arch": {}, "neck_dim": 16}
    return types.SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def reference():
    """The package's own model, loaded the way its inference module does."""
    weights, datasets = torch.load(
        aisfx.inference.get_path_modelWeights(), map_location="cpu", weights_only=False
    )
    return aisfx.inference.load_bestModel(weights, datasets, "cpu")


def test_full_depth_matches_package_embedding(reference):
    enc = build_encoder(aisfx_cfg())
    enc.grow_to(enc.total_blocks)
    # In float64 the two implementations agree to ~1e-12 on every processor (in float32 their different
    # kernel paths differ in the last bits from one processor to another).
    enc.eval().double()
    ref = copy.deepcopy(reference).double()
    x = torch.rand(2, 40, 96, dtype=torch.float64)
    with torch.no_grad():
        hidden, context = enc.forward_prefix(enc.prepare(x), enc.depth)
        got = enc.pool(hidden, context)
        want = ref.get_embedding(x.clone())
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_grows_one_conv_layer_at_a_time():
    enc = build_encoder(aisfx_cfg(pretrained=""))
    assert enc.total_blocks == 6 and enc.width == 64
    x = torch.rand(2, 32, 96)
    for width in WIDTHS:
        enc.grow(1)
        assert enc.width == width and enc.norm.normalized_shape == (width,)
        assert enc(enc.prepare(x)).shape == (2, 16)


def test_weights_and_layout(reference):
    enc = build_encoder(aisfx_cfg())
    enc.grow(2)
    keys = enc.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"stem", "blocks", "norm", "neck"}
    torch.testing.assert_close(enc.stem[0].conv.weight, reference.embedding_net.conv_block1.conv1.weight)
    torch.testing.assert_close(
        enc.blocks[1].bn.running_var, reference.embedding_net.conv_block2.bn2.running_var
    )
    random = build_encoder(aisfx_cfg(), load_weights=False)
    assert not torch.equal(random.stem[0].conv.weight, enc.stem[0].conv.weight)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="neck_dim"):
        build_encoder(aisfx_cfg(neck_dim=0))
    with pytest.raises(ValueError, match="package"):
        build_encoder(aisfx_cfg(pretrained="/some/checkpoint.pth"))
    enc = build_encoder(aisfx_cfg(pretrained=""))
    with pytest.raises(ValueError, match="96"):
        enc(enc.prepare(torch.rand(2, 32, 128)))
