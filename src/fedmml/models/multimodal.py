"""Multimodal models built from staged encoders: the contrastive image-text dual encoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedmml.config import ModelConfig
from fedmml.models.backends import build_encoder
from fedmml.models.heads import ProjectionHead
from fedmml.models.staged import StagedEncoder


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of L2-normalised embeddings (mean of both directions)."""
    logits = logit_scale * image_emb @ text_emb.t()
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class DualEncoder(nn.Module):
    """Image and text encoders, one projection head each, CLIP loss with a fixed or learnable temperature."""

    def __init__(self, image: StagedEncoder, text: StagedEncoder, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"image": image, "text": text})
        h = cfg.head
        self.heads = nn.ModuleDict(
            {
                m: ProjectionHead(enc.out_dim, h.hidden_dim, h.out_dim, h.num_layers, h.dropout, h.batchnorm)
                for m, enc in self.encoders.items()
            }
        )
        scale = torch.tensor(math.log(1.0 / cfg.temperature))
        if cfg.learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            # A plain attribute, not a buffer: a fixed temperature is configuration, not state to exchange.
            self.logit_scale = scale

    def embed(self, modality: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised projection of one modality's inputs."""
        return F.normalize(self.heads[modality](self.encoders[modality](inputs)), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings."""
        return self.embed("image", {"pixel_values": pixels})

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings; tokenises with the text encoder's own tokenizer."""
        device = next(self.parameters()).device
        tokens = {k: v.to(device) for k, v in self.encoders["text"].tokenize(texts).items()}
        return self.embed("text", tokens)

    def loss(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Contrastive loss of one batch of image-caption pairs."""
        scale = self.logit_scale.exp().clamp(max=100.0).to(pixels.device)
        return clip_loss(self.encode_image(pixels), self.encode_text(texts), scale)


def build_model(cfg: ModelConfig, load_weights: bool = True) -> DualEncoder:
    """The dual encoder at depth 0; ``load_weights=False`` skips pretrained weights (clients receive them)."""
    return DualEncoder(build_encoder(cfg.image, load_weights), build_encoder(cfg.text, load_weights), cfg)
