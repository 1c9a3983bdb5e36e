"""LoRA adapters for the `lora` reference method: where they go, and that fresh ones change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmml.config import load_config
from fedmml.methods import configure, plan_stages
from fedmml.models.build import build_model
from fedmml.models.lora import adapted_layers


def _grown(model):
    for encoder in model.encoders.values():
        encoder.grow_to(encoder.total_blocks)
    return model


def test_adapters_on_projections_and_pointwise_convolutions_only() -> None:
    model = build_model(load_config("emoji").model, load_weights=False)
    mbconv = model.encoders["image"].block_pool[1]
    assert adapted_layers(mbconv) == ["_expand_conv", "_project_conv"]  # not the depthwise convolution
    bert = model.encoders["text"].block_pool[0]
    assert len(adapted_layers(bert)) == 6 and all(
        isinstance(bert.get_submodule(n), nn.Linear) for n in adapted_layers(bert)
    )


@pytest.mark.parametrize("preset", ["tiny", "emoji"])  # ViT + BERT; EfficientNet-Lite + MiniLM
def test_fresh_adapters_compute_what_the_model_without_them_does(preset: str) -> None:
    cfg = load_config(preset)
    torch.manual_seed(0)
    plain = _grown(build_model(cfg.model, load_weights=False))
    torch.manual_seed(0)
    adapted = _grown(build_model(cfg.model, load_weights=False, adapters=True))
    base = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if ".lora_" not in k}
    assert base.keys() == plain.state_dict().keys()
    plain.load_state_dict(base)
    plain.eval(), adapted.eval()
    pixels = torch.randn(2, 3, cfg.model.image.image_size, cfg.model.image.image_size)
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(pixels), adapted.encode_image(pixels), atol=1e-6)
        texts = ["a red square", "two cats"]
        assert torch.allclose(plain.encode_text(texts), adapted.encode_text(texts), atol=1e-6)


def test_lora_trains_adapters_norms_necks_and_heads() -> None:
    cfg = load_config("tiny", ['run.method="lora"'])
    model = build_model(cfg.model, load_weights=False, adapters=True)
    (stage,) = plan_stages(
        cfg.active_schedule, "lora", {m: e.total_blocks for m, e in model.encoders.items()}
    )
    _grown(model)
    keys = configure(model, "lora", stage)
    encoder_keys = [k for k in keys if k.startswith("encoders.")]
    assert encoder_keys and all(".lora_" in k or ".norm." in k or ".neck." in k for k in encoder_keys)
    assert not any(".base_layer." in k or ".stem." in k for k in keys)
    assert any(k.startswith("heads.") for k in keys)
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= set(keys)


@pytest.mark.slow
def test_a_lora_run_keeps_the_pretrained_weights_and_sends_a_fraction(emoji_root, tmp_path) -> None:
    from fedmml.experiment import run_experiment
    from fedmml.runs import load_run_model, read_metrics
    from fedmml.setup import global_model

    overrides = [f'data.root="{emoji_root}"', "run.threads=1", "schedules.uniform.rounds=[1, 0, 0]"]
    cfg = load_config("tiny", [*overrides, 'run.method="lora"'])
    run_experiment(cfg, tmp_path / "lora")
    start = _grown(global_model(cfg, torch.device("cpu"))).state_dict()
    trained = load_run_model(tmp_path / "lora")[1].state_dict()
    assert start.keys() == trained.keys()
    for key, value in start.items():
        if ".base_layer." in key or ".stem." in key:
            assert torch.equal(trained[key], value), key  # the pretrained weights stay as they were
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in trained.items())  # the adapters learned
    records = read_metrics(tmp_path / "lora")
    # Round 1 sends the whole model down; every upload is a small fraction of it.
    assert all(r["bytes_up"] < records[0]["bytes_down"] / 5 for r in records)
    assert all(r["upload_parts"]["stems"] == 0 for r in records)
