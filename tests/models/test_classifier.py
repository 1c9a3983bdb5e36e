"""The late-fusion classifier on tiny random image (ViT) and audio (AST) encoders."""

from __future__ import annotations

import pytest
import torch

from fedmml.config import EncoderConfig, HeadConfig, ModelConfig, PredictorConfig
from fedmml.models.backends import build_encoder
from fedmml.models.classifier import FusionClassifier

NUM_CLASSES = 3
TINY_VIT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
TINY_AST = {
    "hidden_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "num_mel_bins": 32,
    "max_length": 32,
    "patch_size": 16,
    "frequency_stride": 16,
    "time_stride": 16,
}


def make_model(dropout: float = 0.1, depth: int = 2) -> FusionClassifier:
    torch.manual_seed(0)
    image = EncoderConfig(backend="hf_vit", arch={**TINY_VIT, "patch_size": 8}, image_size=16)
    audio = EncoderConfig(backend="hf_ast", arch=TINY_AST, pooling="mean")
    cfg = ModelConfig(
        head=HeadConfig(hidden_dim=32, out_dim=8, num_layers=2, dropout=dropout),
        predictor=PredictorConfig(hidden_dim=16, dropout=dropout),
    )
    # Passed in reverse order: the fusion order must not depend on it.
    encoders = {"image": build_encoder(image), "audio": build_encoder(audio)}
    for enc in encoders.values():
        enc.grow_to(depth)
    return FusionClassifier(encoders, cfg, NUM_CLASSES)


def make_batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(n, 3, 16, 16, generator=g),
        "audio": torch.randn(n, 32, 32, generator=g),
        "labels": torch.arange(n) % NUM_CLASSES,
    }


def test_shapes_and_structure():
    model = make_model()
    batch = make_batch()
    assert model.modalities == ["audio", "image"]
    assert list(model.encoders) == ["audio", "image"]
    assert {name for name, _ in model.named_children()} == {"encoders", "heads", "predictor"}
    assert model.predictor.net[0].in_features == 2 * 8
    model.eval()
    with torch.no_grad():
        logits = model.logits(batch)
    assert logits.shape == (4, NUM_CLASSES)
    features = model.features(batch)
    assert features["image"].shape == (4, 16) and features["audio"].shape == (4, 24)


def test_default_predictor_is_the_papers():
    model = FusionClassifier(
        {"image": build_encoder(EncoderConfig(arch={**TINY_VIT, "patch_size": 8}, image_size=16))},
        ModelConfig(head=HeadConfig(hidden_dim=32, out_dim=256, num_layers=2)),
        num_classes=13,
    )
    linears = [m for m in model.predictor.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 256), (256, 13)]


def test_loss_is_finite_and_reaches_every_parameter():
    model = make_model()
    loss = model.loss(make_batch())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_loss_from_features_matches_loss():
    model = make_model(dropout=0.0)
    batch = make_batch()
    torch.testing.assert_close(model.loss_from_features(model.features(batch), batch), model.loss(batch))


def test_a_few_steps_reduce_the_loss():
    # No dropout, so the loss of the fixed batch is a deterministic function of the weights.
    model = make_model(dropout=0.0, depth=1)
    batch = make_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_rejects_no_encoders():
    with pytest.raises(ValueError, match="at least one encoder"):
        FusionClassifier({}, ModelConfig(), NUM_CLASSES)
