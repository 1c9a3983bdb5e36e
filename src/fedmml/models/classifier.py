"""Supervised late-fusion classifier (the paper's ADVANCE "SupAdvance" model) built from staged encoders.

Each modality's encoder feature goes through its own projection head; the projections are concatenated in
sorted-modality order and a prediction head maps them to class logits, trained with plain cross-entropy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmml.config import ModelConfig
from fedmml.models.heads import PredictionHead, ProjectionHead
from fedmml.models.multimodal import MultimodalModel
from fedmml.models.staged import StagedEncoder


class FusionClassifier(MultimodalModel):
    """One encoder and projection head per modality, concatenated projections, a prediction head."""

    def __init__(self, encoders: dict[str, StagedEncoder], cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("a fusion classifier needs at least one encoder")
        # Sorted once, so the concatenation order does not depend on how the caller ordered the dict.
        self.modalities = sorted(encoders)
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        h = cfg.head
        # Top-level children other than `encoders` are the always-trainable heads of every method.
        self.heads = nn.ModuleDict(
            {
                m: ProjectionHead(enc.out_dim, h.hidden_dim, h.out_dim, h.num_layers, h.dropout, h.batchnorm)
                for m, enc in self.encoders.items()
            }
        )
        p = cfg.predictor
        self.predictor = PredictionHead(
            h.out_dim * len(self.modalities), p.hidden_dim, num_classes, p.num_layers, p.dropout
        )
        self.num_classes = num_classes

    def logits_from_features(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits [batch, num_classes] from the encoders' features."""
        fused = torch.cat([self.heads[m](features[m]) for m in self.modalities], dim=-1)
        return self.predictor(fused)

    def loss_from_features(self, features: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """Cross-entropy of the fused prediction against ``batch["labels"]``."""
        logits = self.logits_from_features(features)
        return F.cross_entropy(logits, batch["labels"].to(logits.device))

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Class logits of one batch (for evaluation)."""
        return self.logits_from_features(self.features(batch))
