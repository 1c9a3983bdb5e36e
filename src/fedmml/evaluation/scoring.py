"""Scoring a dual encoder: retrieval over a whole held-out split, and zero-shot classification."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmml.evaluation.retrieval import build_relevance, chance_rsum, recall_of_embeddings
from fedmml.evaluation.zeroshot import DEFAULT_TEMPLATES, prompts, zero_shot_accuracy
from fedmml.models.multimodal import DualEncoder


@torch.no_grad()
def encode_images(model: DualEncoder, pixels: Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Normalised embeddings of a sequence of preprocessed images."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(pixels), batch_size):
        # Index by index: ``pixels`` may be a dataset's lazy view, read one image at a time.
        batch = torch.stack([pixels[i] for i in range(start, min(start + batch_size, len(pixels)))])
        out.append(model.encode_image(batch.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model: DualEncoder, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Normalised embeddings of a list of texts."""
    return torch.cat(
        [
            model.encode_text(list(texts[s : s + batch_size])).float().cpu()
            for s in range(0, len(texts), batch_size)
        ]
    )


def retrieval_scores(
    model: DualEncoder,
    pixels: Sequence[torch.Tensor],
    captions: list[list[str]],
    batch_size: int,
    ks: Sequence[int],
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@K (percent) and rsum over every image and caption given."""
    was_training = model.training
    model.eval()
    try:
        texts, relevant = build_relevance(captions)
        image_emb = encode_images(model, pixels, batch_size)
        text_emb = encode_texts(model, texts, batch_size)
        return recall_of_embeddings(image_emb, text_emb, relevant, tuple(ks))
    finally:
        model.train(was_training)


def retrieval_chance(captions: list[list[str]], ks: Sequence[int]) -> float:
    """rsum of a random ranking on the same split, for "far above chance" comparisons."""
    return chance_rsum(build_relevance(captions)[1], tuple(ks))


def zeroshot_score(
    model: DualEncoder, pixels: torch.Tensor, labels: torch.Tensor, classnames: list[str], batch_size: int
) -> float:
    """Top-1 zero-shot accuracy (percent) with prompt ensembling over the default templates."""
    was_training = model.training
    model.eval()
    try:
        texts = prompts(classnames, DEFAULT_TEMPLATES)
        class_emb = encode_texts(model, texts, batch_size).view(len(classnames), len(DEFAULT_TEMPLATES), -1)
        image_emb = encode_images(model, pixels, batch_size)
        return zero_shot_accuracy(image_emb, class_emb, labels)
    finally:
        model.train(was_training)
