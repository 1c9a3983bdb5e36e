"""hf_auto: any Hugging Face encoder whose blocks it finds, staged; and backends registered by users."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedmml.config import ConfigError, EncoderConfig, load_config
from fedmml.experiment import build_setup
from fedmml.models.backends import BACKENDS, build_encoder, register_backend
from fedmml.models.backends.hf_vit import HFViTEncoder

SMALL = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
IMAGE = {**SMALL, "image_size": 32, "patch_size": 8}
TOWERS = {
    "vit": IMAGE,
    "clip_vision_model": IMAGE,
    "roberta": SMALL,
    "bert": SMALL,
}


def _encoder(model_type: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        backend="hf_auto", arch={"model_type": model_type, **TOWERS[model_type]}, image_size=32
    )
    encoder = build_encoder(replace(cfg, **extra), load_weights=False).eval()
    encoder.grow_to(encoder.total_blocks)
    return encoder


@pytest.mark.parametrize("model_type", ["vit", "clip_vision_model"])
def test_an_image_tower_computes_what_the_model_itself_does(model_type: str) -> None:
    from transformers import AutoConfig, AutoModel

    encoder = _encoder(model_type)
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **IMAGE)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=pixels)
        ours = encoder(encoder.prepare(pixels))
    # ViT normalises every token and the first is its CLS; CLIP's pooled output is the normalised first token.
    want = out.pooler_output if model_type.startswith("clip") else out.last_hidden_state[:, 0]
    torch.testing.assert_close(ours, want)


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_a_text_tower_computes_what_the_model_itself_does(model_type: str) -> None:
    from transformers import AutoConfig, AutoModel

    encoder = _encoder(model_type)
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **SMALL)).eval()
    texts = ["a red square", "a small green emoji with a hat"]  # padded: the mask matters
    inputs = encoder.tokenize(texts)
    with torch.no_grad():
        want = model(**inputs).last_hidden_state[:, 0]
        ours = encoder(encoder.prepare(texts))
    torch.testing.assert_close(ours, want)


def test_what_cannot_be_staged_is_one_line() -> None:
    with pytest.raises(ConfigError, match="attends causally"):
        build_encoder(EncoderConfig(backend="hf_auto", arch={"model_type": "gpt2", "n_layer": 2}), False)
    with pytest.raises(ConfigError, match="found no blocks in ViTModel: none of nope"):
        _encoder("vit", blocks="nope")
    with pytest.raises(ConfigError, match="no stem at nope"):
        _encoder("vit", stem="nope")
    with pytest.raises(ConfigError, match="needs arch.model_type"):
        build_encoder(EncoderConfig(backend="hf_auto"), False)


AUTO = [
    'model.image.backend="hf_auto"',
    'model.image.arch={model_type="clip_vision_model", hidden_size=32, num_hidden_layers=6, '
    "num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8}",
    'model.text.backend="hf_auto"',
    'model.text.arch={model_type="roberta", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, '
    "intermediate_size=64}",
    "schedules.uniform.rounds=[1, 1, 1]",
    "eval.every=0",
    "run.threads=1",
]


@pytest.mark.slow
def test_clip_vision_and_roberta_train_lw_exactly_from_the_cache_and_prog(
    emoji_root: Path, same_trajectory
) -> None:
    runs = {}
    for name, extra in {
        "lw": ['run.method="lw"'],
        "lw-nocache": ['run.method="lw"', "cache.frozen_prefix=false"],
        "prog": ['run.method="prog"'],
    }.items():
        cfg = load_config("tiny", [f'data.root="{emoji_root}"', *AUTO, *extra])
        runs[name] = build_setup(cfg).run_rounds()
    losses = {name: [m["train_loss"] for m in metrics] for name, metrics in runs.items()}
    same_trajectory(losses["lw"], losses["lw-nocache"], 192 // 3 // 16)
    assert runs["lw"][-1]["client_cache_bytes"] > 0
    for name in ("lw", "prog"):  # per-stage client cost, measured
        assert all(m["client_peak_mem_bytes"] > 0 and m["client_flops"] > 0 for m in runs[name])
        assert len({m["stage"] for m in runs[name]}) == 3
    # LW trains a slice, Prog the whole grown model: Prog costs more FLOPs in the last stage.
    assert runs["prog"][-1]["client_flops"] > runs["lw"][-1]["client_flops"]


def test_a_registered_backend_builds_and_a_built_in_one_stays() -> None:
    built = []

    def mine(cfg: EncoderConfig, load_weights: bool) -> HFViTEncoder:
        built.append(cfg.arch)
        return HFViTEncoder(replace(cfg, backend="hf_vit"), load_weights)

    register_backend("my_vit", mine)
    try:
        cfg = EncoderConfig(backend="my_vit", arch=IMAGE, image_size=32)
        assert build_encoder(cfg, False).total_blocks == 3 and built == [IMAGE]
        with pytest.raises(ConfigError, match="built in"):
            register_backend("hf_vit", mine)
        register_backend("not_staged", lambda cfg, load: torch.nn.Linear(2, 2))
        with pytest.raises(ConfigError, match="not a StagedEncoder"):
            build_encoder(replace(cfg, backend="not_staged"), False)
    finally:
        BACKENDS.pop("my_vit", None)
        BACKENDS.pop("not_staged", None)
