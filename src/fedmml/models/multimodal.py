"""Multimodal models built from staged encoders: the shared base and the contrastive image-text dual encoder.

A training batch is a dict: one raw input per modality (``"image"``: pixels, ``"text"``: strings, ``"audio"``:
filterbanks) plus task fields (``"labels"``). :meth:`MultimodalModel.features` runs every encoder;
:meth:`MultimodalModel.loss_from_features` is the task's objective on those features, so a frozen-prefix cache
can supply the features another way and reuse the same objective.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmml.config import ModelConfig
from fedmml.models.heads import ProjectionHead
from fedmml.models.staged import StagedEncoder

# Optional batch key: per modality, a bool tensor [batch], True where the sample holds that modality (see
# fedmml.data.missing). An encoder runs on its modality's present rows only, so no absent sample reaches
# its BatchNorm statistics; a batch without the key is complete.
PRESENT = "present"


def present_rows(batch: dict[str, Any], modality: str) -> torch.Tensor | None:
    """Indices of ``batch``'s rows that hold ``modality``; None when every row does."""
    mask = batch.get(PRESENT, {}).get(modality)
    if mask is None or bool(mask.all()):
        return None
    return mask.nonzero().flatten()


def held_mask(batch: dict[str, Any], modality: str) -> torch.Tensor:
    """Which rows of an incomplete ``batch`` hold ``modality`` (all, when its mask is not given)."""
    masks = batch[PRESENT]
    return masks.get(modality, torch.ones(len(next(iter(masks.values()))), dtype=torch.bool))


def one_sided_rows(batch: dict[str, Any], modality: str, modalities: list[str]) -> torch.Tensor:
    """Indices of an incomplete ``batch``'s rows that hold ``modality`` and none of the other
    ``modalities``."""
    alone = held_mask(batch, modality).clone()
    for other in modalities:
        if other != modality:
            alone &= ~held_mask(batch, other)
    return alone.nonzero().flatten()


def take_rows(raw: Any, rows: torch.Tensor | None) -> Any:
    """``rows`` of a batch's raw inputs (a tensor or a list); all of them when ``rows`` is None."""
    if rows is None:
        return raw
    if isinstance(raw, torch.Tensor):
        return raw[rows]
    return [raw[i] for i in rows.tolist()]


def second_view(modality: str, raw: Any) -> Any:
    """Another view of a batch of one modality's raw inputs, for a unimodal contrastive term: each image
    randomly cropped to 50-100 % of its side, resized back and flipped half the time (torch's global RNG,
    seeded per round); text as it is (the encoder's dropout makes its second view)."""
    if modality != "image":
        return raw
    size = raw.shape[-1]
    views = []
    for pixels in raw:
        side = int(size * (0.5 + 0.5 * float(torch.rand(()))))
        top, left = (int(torch.randint(0, size - side + 1, ())) for _ in range(2))
        crop = pixels[:, top : top + side, left : left + side].unsqueeze(0)
        view = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        views.append(view.flip(-1) if bool(torch.rand(()) < 0.5) else view)
    return torch.stack(views)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of L2-normalised embeddings (mean of both directions)."""
    logits = logit_scale * image_emb @ text_emb.t()
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class MultimodalModel(nn.Module):
    """Staged encoders (``self.encoders``, one per modality) and a task objective on their features."""

    encoders: nn.ModuleDict

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.parameters()).device

    def inputs(self, modality: str, raw: Any) -> dict[str, torch.Tensor]:
        """One modality's backend inputs for a batch of raw inputs, on the model's device."""
        device = self.device
        # Non-blocking: from pinned memory (the training loader's on a GPU) the copy overlaps compute.
        return {k: v.to(device, non_blocking=True) for k, v in self.encoders[modality].prepare(raw).items()}

    def prepare(self, batch: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """Each modality's backend inputs (e.g. token ids) for the rows of ``batch`` that hold it, on the
        model's device; a modality no row holds has none."""
        prepared = {}
        for m in self.encoders:
            rows = present_rows(batch, m)
            if rows is None or len(rows):
                prepared[m] = self.inputs(m, take_rows(batch[m], rows))
        return prepared

    def features(
        self, batch: dict[str, Any], prepared: dict[str, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Every encoder's output feature for the rows of ``batch`` that hold its modality (a modality no
        row holds has none); ``prepared``: :meth:`prepare`'s inputs when the caller already made them."""
        prepared = self.prepare(batch) if prepared is None else prepared
        return {m: self.encoders[m](inputs) for m, inputs in prepared.items()}

    # Whether a batch with incomplete rows runs whole encoders again inside the loss (a second view), so a
    # client with a frozen-prefix cache still needs its frozen weights.
    reruns_encoders = False

    def loss_from_features(self, features: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """The task's training loss, given the encoders' features."""
        raise NotImplementedError

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Training loss of one batch."""
        return self.loss_from_features(self.features(batch), batch)


class DualEncoder(MultimodalModel):
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
        self.unimodal_weight = cfg.unimodal_weight
        scale = torch.tensor(math.log(1.0 / cfg.temperature))
        if cfg.learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            # Not persistent: a fixed temperature is configuration, not state to exchange; a buffer all the
            # same, so it moves with the model and a step on a GPU never copies it from the host (a wait).
            self.register_buffer("logit_scale", scale, persistent=False)

    @property
    def reruns_encoders(self) -> bool:
        """A one-sided sample's unimodal term runs its encoder again (when it has a weight)."""
        return self.unimodal_weight > 0

    def embed(self, modality: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised projection of one modality's inputs."""
        return F.normalize(self.heads[modality](self.encoders[modality](inputs)), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings."""
        return self.embed("image", self.inputs("image", pixels))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings; tokenises with the text encoder's own tokenizer."""
        return self.embed("text", self.inputs("text", texts))

    def loss_from_features(self, features: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """Contrastive loss of one batch of image-caption pairs; with incomplete pairs (``PRESENT``), the
        complete ones' contrastive loss and, for the rows that hold one side only, that side's unimodal term
        (:meth:`unimodal_loss`), weighted by ``model.unimodal_weight`` per row."""
        scale = self.logit_scale.exp().clamp(max=100.0)
        rows = {m: present_rows(batch, m) for m in ("image", "text")}
        if rows["image"] is None and rows["text"] is None:
            image, text = (F.normalize(self.heads[m](features[m]), dim=-1) for m in ("image", "text"))
            return clip_loss(image, text, scale)
        held = {m: held_mask(batch, m) for m in rows}
        # Feature row of each batch row, per modality (features hold the present rows, in batch order).
        place = {m: torch.cumsum(held[m].long(), 0) - 1 for m in rows}
        terms: list[tuple[float, torch.Tensor]] = []
        complete = (held["image"] & held["text"]).nonzero().flatten()
        if len(complete) >= 2:
            image, text = (
                F.normalize(self.heads[m](features[m][place[m][complete]]), dim=-1) for m in ("image", "text")
            )
            terms.append((float(len(complete)), clip_loss(image, text, scale)))
        for m in rows:
            alone = one_sided_rows(batch, m, list(rows))
            if len(alone) >= 2 and self.unimodal_weight > 0:
                loss = self.unimodal_loss(m, features[m][place[m][alone]], take_rows(batch[m], alone), scale)
                terms.append((self.unimodal_weight * len(alone), loss))
        if not terms:  # nothing this batch can learn from; a zero that still reaches every trainable tensor
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        return sum(w * t for w, t in terms) / sum(w for w, _ in terms)

    def unimodal_loss(
        self, modality: str, first: torch.Tensor, raw: Any, scale: torch.Tensor
    ) -> torch.Tensor:
        """The contrastive loss between two views of the same samples of one modality: ``first`` is their
        feature as trained; the second view runs the whole encoder again, on a random crop and flip of the
        pixels for images (SimCLR) and on the same tokens for text, whose dropout makes the view (SimCSE)."""
        second = self.encoders[modality](self.inputs(modality, second_view(modality, raw)))
        one, two = (F.normalize(self.heads[modality](f), dim=-1) for f in (first, second))
        return clip_loss(one, two, scale)
