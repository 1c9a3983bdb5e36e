"""Zero-shot classification: label images by the class whose prompt embedding is nearest, CLIP-style."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "an icon of a {}.")


def prompts(classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """Class-major prompts (all templates of class 0, then class 1, ...): embeddings reshape to [C, P, D]."""
    return [template.format(_spoken(name)) for name in classnames for template in templates]


def class_embeddings(class_text_emb: Tensor) -> Tensor:
    """One unit vector per class from [C, D] or [C, P, D] embeddings (mean of unit prompts, renormalised)."""
    if class_text_emb.dim() == 3:
        # Averaging unit vectors weighs every template equally, whatever its embedding norm (CLIP ensembling).
        class_text_emb = F.normalize(class_text_emb.float(), dim=-1).mean(dim=1)
    if class_text_emb.dim() != 2:
        raise ValueError(f"class_text_emb must be [C, D] or [C, P, D], got {tuple(class_text_emb.shape)}")
    return F.normalize(class_text_emb.float(), dim=-1)


def zero_shot_accuracy(image_emb: Tensor, class_text_emb: Tensor, labels: Tensor) -> float:
    """Percent of images whose highest-cosine class embedding is their label."""
    if image_emb.shape[0] != labels.shape[0] or image_emb.shape[0] == 0:
        raise ValueError(f"need as many labels as images (>0): {image_emb.shape[0]} vs {labels.shape[0]}")
    classes = class_embeddings(class_text_emb.detach()).to(image_emb.device)
    predicted = (F.normalize(image_emb.detach().float(), dim=-1) @ classes.t()).argmax(dim=1)
    return 100.0 * (predicted == labels.to(predicted.device)).double().mean().item()


def _spoken(classname: str) -> str:
    """Class name as it reads in a sentence: lowercase, and "T-shirt/top" becomes "t-shirt or top"."""
    return re.sub(r"\s+", " ", classname.replace("/", " or ").lower()).strip()
