"""Supervised late-fusion classifier (the paper's ADVANCE "SupAdvance" model) built from staged encoders.

Each modality's encoder feature goes through its own projection head; the projections are concatenated in
sorted-modality order and a prediction head maps them to class logits, trained with plain cross-entropy.
Built for incomplete data (``missing``), the model holds one learned embedding per modality that stands in
for the projection of a sample lacking it, so such a sample still trains the fusion and its present tower.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmml.config import ModelConfig
from fedmml.models.heads import PredictionHead, ProjectionHead
from fedmml.models.multimodal import PRESENT, MultimodalModel, present_rows
from fedmml.models.staged import StagedEncoder


class FusionClassifier(MultimodalModel):
    """One encoder and projection head per modality, concatenated projections, a prediction head."""

    def __init__(
        self, encoders: dict[str, StagedEncoder], cfg: ModelConfig, num_classes: int, missing: bool = False
    ) -> None:
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
        if missing:
            # Zeros: an absent modality first contributes nothing to the fusion, then what training finds.
            self.missing = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(h.out_dim)) for m in self.modalities}
            )

    def _projection(
        self, modality: str, features: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> torch.Tensor:
        """``modality``'s projection for every row of the batch: the head's output where the sample holds the
        modality, the learned missing embedding where it does not."""
        rows = present_rows(batch, modality)
        if rows is None:
            return self.heads[modality](features[modality])
        if not hasattr(self, "missing"):
            raise ValueError(
                f"a batch lacks {modality} in some rows, but the model has no missing embeddings"
            )
        filler = self.missing[modality].unsqueeze(0).expand(len(batch[PRESENT][modality]), -1)
        if not len(rows):
            return filler
        projected = self.heads[modality](features[modality])
        rows = rows.to(projected.device, non_blocking=True)
        return filler.to(projected.dtype).index_copy(0, rows, projected)

    def logits_from_features(self, features: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """Class logits [batch, num_classes] from the encoders' features of ``batch``'s present rows."""
        fused = torch.cat([self._projection(m, features, batch) for m in self.modalities], dim=-1)
        return self.predictor(fused)

    def loss_from_features(self, features: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """Cross-entropy of the fused prediction against ``batch["labels"]``."""
        logits = self.logits_from_features(features, batch)
        return F.cross_entropy(logits, batch["labels"].to(logits.device, non_blocking=True))

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Class logits of one batch (for evaluation)."""
        return self.logits_from_features(self.features(batch), batch)
