"""The model of a task, built from its config: every modality's staged encoder, then the task's heads."""

from __future__ import annotations

from fedmml.config import ConfigError, ModelConfig
from fedmml.models.backends import build_encoder
from fedmml.models.classifier import FusionClassifier
from fedmml.models.multimodal import DualEncoder, MultimodalModel


def build_model(
    cfg: ModelConfig, load_weights: bool = True, adapters: bool = False, missing: bool = False
) -> MultimodalModel:
    """The task's model at depth 0; ``load_weights=False`` skips pretrained weights (clients receive them);
    ``adapters`` adds LoRA adapters to every encoder block (the ``lora`` method); ``missing`` adds the
    classifier's learned embeddings of absent modalities (incomplete data, fedmml.data.missing)."""
    encoders = {m: build_encoder(cfg.encoder(m), load_weights) for m in cfg.modalities}
    if cfg.task == "image-text":
        model: MultimodalModel = DualEncoder(encoders["image"], encoders["text"], cfg)
    elif cfg.num_classes < 2:
        raise ConfigError(
            "model.num_classes must be at least 2 for an image-audio model (runs take it from the data)"
        )
    else:
        model = FusionClassifier(encoders, cfg, cfg.num_classes, missing)
    if adapters:
        from fedmml.models.lora import add_adapters  # deferred: peft imports take a second

        add_adapters(model, cfg)
    return model
