"""The AST backend: equality with transformers' ASTModel, growth, state-dict layout, token counts."""

from __future__ import annotations

import types

import pytest
import torch

from fedmml.models.backends import BACKENDS, build_encoder

TINY_AST = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_mel_bins": 32,
    "max_length": 48,
    "patch_size": 16,
    "frequency_stride": 16,
    "time_stride": 16,
}


def ast_cfg(**kw) -> types.SimpleNamespace:
    """Stand-in for fedmml.config.EncoderConfig (audio encoders)."""
    base = {"backend": "hf_ast", "pretrained": "", "arch": dict(TINY_AST), "neck_dim": 0, "pooling": "mean"}
    return types.SimpleNamespace(**{**base, **kw})


def fbank(batch: int, arch: dict = TINY_AST) -> torch.Tensor:
    return torch.randn(batch, arch["max_length"], arch["num_mel_bins"])


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory):
    """A tiny random AST saved in Hugging Face format, with non-trivial final-norm weights."""
    from transformers import ASTConfig, ASTModel

    torch.manual_seed(0)
    model = ASTModel(ASTConfig(**TINY_AST))
    with torch.no_grad():
        # Random init zeroes CLS, distillation and positions; make them count, and the norm non-identity.
        for p in (model.embeddings.cls_token, model.embeddings.distillation_token):
            p.normal_()
        model.embeddings.position_embeddings.normal_(std=0.1)
        model.layernorm.weight.uniform_(0.5, 1.5)
        model.layernorm.bias.normal_(std=0.1)
    path = tmp_path_factory.mktemp("ast")
    model.save_pretrained(path)
    return path


def test_registered():
    assert "hf_ast" in BACKENDS


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_matches_reference(ast_dir, pooling):
    from transformers import ASTModel

    # In float64: two implementations of one network then agree to ~1e-12 on every processor, where in
    # float32 their different summation orders differ in the last bits from one processor to another.
    ref = ASTModel.from_pretrained(ast_dir).eval().double()
    enc = build_encoder(ast_cfg(pretrained=str(ast_dir), arch={}, pooling=pooling))
    enc.grow_to(enc.total_blocks)
    enc.eval().double()
    x = fbank(3).double()
    with torch.no_grad():
        out = ref(x)
        want = out.pooler_output if pooling == "mean" else out.last_hidden_state[:, 0]
        got = enc(enc.prepare(x))
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    # The pretrained final norm is kept, not replaced by a fresh one.
    torch.testing.assert_close(enc.norm.weight, ref.layernorm.weight, atol=0, rtol=0)
    torch.testing.assert_close(enc.norm.bias, ref.layernorm.bias, atol=0, rtol=0)


def test_grows_one_block_at_a_time():
    enc = build_encoder(ast_cfg())
    x = fbank(2)
    assert enc.depth == 0 and enc.total_blocks == 3
    assert enc(enc.prepare(x)).shape == (2, 32)
    for depth in (1, 2, 3):
        assert list(enc.grow(1)) == [depth - 1]
        assert enc.depth == depth
        out = enc(enc.prepare(x))
        assert out.shape == (2, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        enc.grow(1)


def test_state_dict_layout():
    enc = build_encoder(ast_cfg(neck_dim=8))
    enc.grow_to(2)
    prefixes = {k.split(".")[0] for k in enc.state_dict()}
    assert prefixes == {"stem", "blocks", "norm", "neck"}
    assert {k.split(".")[1] for k in enc.state_dict() if k.startswith("blocks.")} == {"0", "1"}
    assert {k for k in enc.state_dict() if k.startswith("norm.")} == {"norm.weight", "norm.bias"}
    assert "stem.cls_token" in enc.state_dict() and "stem.distillation_token" in enc.state_dict()
    assert enc(enc.prepare(fbank(2))).shape == (2, 8)


@pytest.mark.parametrize(
    ("frames", "stride", "tokens"),
    [(48, 16, 2 * 3 + 2), (64, 16, 2 * 4 + 2), (64, 8, 3 * 7 + 2)],
)
def test_arch_sets_token_count(frames, stride, tokens):
    arch = {**TINY_AST, "max_length": frames, "frequency_stride": stride, "time_stride": stride}
    enc = build_encoder(ast_cfg(arch=arch))
    enc.grow(1)
    assert enc.num_tokens == tokens
    hidden, _ = enc.forward_prefix(enc.prepare(fbank(2, arch)), upto=1)
    assert hidden.shape == (2, tokens, 32)


def test_rejects_wrong_frame_count():
    enc = build_encoder(ast_cfg())
    with pytest.raises(ValueError, match="max_length"):
        enc(enc.prepare(torch.randn(2, 40, 32)))


def test_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="pooling"):
        build_encoder(ast_cfg(pooling="max"))


def test_prefix_cache_round_trip():
    # The frozen-prefix cache stores per-sample hidden states and rebuilds batches from them.
    enc = build_encoder(ast_cfg())
    enc.grow_to(3)
    enc.eval().double()  # float64: the split and the whole forward agree to ~1e-12 on any processor
    x = fbank(3).double()
    with torch.no_grad():
        hidden, context = enc.forward_prefix(enc.prepare(x), upto=2)
        rows = enc.unbatch(hidden, context)
        rebuilt, rebuilt_context = enc.rebatch(rows)
        torch.testing.assert_close(
            enc.forward_suffix(rebuilt, rebuilt_context, 2), enc(enc.prepare(x)), atol=1e-9, rtol=1e-9
        )
