"""Hugging Face ViT as a staged encoder: patch embeddings as the stem, one transformer layer per block."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from fedmml.models.staged import StagedEncoder

if TYPE_CHECKING:
    from fedmml.config import EncoderConfig


def load_vit(cfg: EncoderConfig, load_weights: bool) -> ViTModel:
    """The ViT of ``cfg``: random init from ``arch``, or a pretrained dir/hub id with ``arch`` overrides."""
    arch = dict(cfg.arch)
    if not cfg.pretrained:
        # Random init: position embeddings sized for the images the encoder will actually see.
        return ViTModel(ViTConfig(**{"image_size": cfg.image_size, **arch}))
    if cfg.pretrained == "package":
        raise ValueError("hf_vit has no packaged weights; use pretrained='' or a local dir / hub id")
    if load_weights:
        return ViTModel.from_pretrained(cfg.pretrained, **arch)
    return ViTModel(ViTConfig.from_pretrained(cfg.pretrained, **arch))


def _pretrained_norm(norm: nn.Module, width: int) -> nn.Module:
    return norm


class HFViTEncoder(StagedEncoder):
    """ViT: stem = embeddings, blocks = layers, pool = CLS token, norm = the final layernorm."""

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True) -> None:
        # from_pretrained returns eval mode, a fresh model train mode; blocks appended later keep the mode
        # they have, so start them all in the mode of a new module.
        model = load_vit(cfg, load_weights).train()
        hidden = model.config.hidden_size
        super().__init__(
            stem=model.embeddings,
            block_pool=list(model.layers),
            widths=[hidden] * len(model.layers),
            # Width never changes, so the base calls this once and gets the pretrained final layernorm
            # (a partial, not a lambda, so the encoder stays picklable).
            make_norm=partial(_pretrained_norm, model.layernorm),
            neck_dim=cfg.neck_dim or None,
            stem_width=hidden,
        )

    def prepare(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch of normalised pixels, [batch, 3, H, W]."""
        return {"pixel_values": raw}

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Patch embeddings with the CLS token; interpolates positions when the image size differs."""
        pixels = inputs["pixel_values"].to(self.stem.patch_embeddings.projection.weight.dtype)
        interpolate = tuple(pixels.shape[-2:]) != tuple(self.stem.image_size)
        return self.stem(pixels, interpolate_pos_encoding=interpolate), None

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """One ViT layer; images need no attention mask."""
        return block(hidden, None)

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """CLS token (LayerNorm is per token, so the final norm may follow the pooling)."""
        return hidden[:, 0]
