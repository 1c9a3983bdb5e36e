"""Image-text retrieval Recall@K over a whole evaluation set, its relevance matrix, and its chance level.

Ranks are exact and cheap: for each query, the items that score *strictly higher* than its best relevant
item count against it, and the items tied with that score are ordered at random: a hit at K is the exact
probability, over that order, that a relevant item comes within the first K. No argsort is needed, the result
does not depend on how a sort would order ties, and a collapsed model (every score equal, or NaN) scores the
chance level rather than a perfect recall. (Exact ties between float similarities of distinct items are rare
in a trained model; this rule matters for degenerate ones, e.g. one a privacy noise has wrecked.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)

# Rows of the similarity matrix processed at once: 1,024 x 25,000 floats is about 100 MB of temporaries.
_CHUNK_ROWS = 1024


def normalise_caption(text: str) -> str:
    """Caption key used for de-duplication: stripped, lowercased, whitespace collapsed."""
    return re.sub(r"\s+", " ", text.strip().lower())


def build_relevance(captions_per_image: Sequence[Sequence[str]]) -> tuple[list[str], Tensor]:
    """Unique normalised captions in first-seen order and the bool matrix ``relevant[image, text]``.

    Captions are de-duplicated because a caption string can belong to several images: the emoji datasets
    carry the same caption (the Unicode name) for the same emoji drawn in two vendor styles, and that
    caption is equally correct for both images. Keeping two copies of the text would make each copy count
    as a miss when the model ranks the other image first, which penalises a correct answer.
    """
    index: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for image, captions in enumerate(captions_per_image):
        for caption in captions:
            text = index.setdefault(normalise_caption(caption), len(index))
            pairs.append((image, text))
    relevant = torch.zeros(len(captions_per_image), len(index), dtype=torch.bool)
    if pairs:
        rows, cols = zip(*pairs, strict=True)
        relevant[list(rows), list(cols)] = True
    return list(index), relevant


def _best_relevant_rank(rows: Callable[[int, int], Tensor], relevant: Tensor) -> Tensor:
    """Per row of ``relevant``: the columns scoring strictly higher than its best relevant column, the other
    columns tied with that score, and the relevant ones tied with it (an int64 row of three); NaN scores as
    the lowest. ``rows(start, stop)`` gives those rows' scores, so no more than a chunk of the score matrix
    exists at once."""
    counts = torch.empty(relevant.shape[0], 3, dtype=torch.long)
    for start in range(0, relevant.shape[0], _CHUNK_ROWS):
        scores = rows(start, start + _CHUNK_ROWS).detach().float().nan_to_num(nan=float("-inf"))
        mask = relevant[start : start + _CHUNK_ROWS].to(scores.device)
        best = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
        tied = scores == best
        chunk = torch.stack([(scores > best).sum(1), (tied & ~mask).sum(1), (tied & mask).sum(1)], dim=1)
        counts[start : start + _CHUNK_ROWS] = chunk.cpu()
    return counts


def _hit_probability(counts: Tensor, k: int) -> Tensor:
    """Per row of :func:`_best_relevant_rank`'s counts, the probability that a relevant item is among the
    first ``k`` when the tied items come in a random order."""
    higher, others, mine = (counts[:, i].double() for i in range(3))
    slots = (k - higher).clamp(min=0)  # places left for the tied items within the first k
    # The chance that the first `slots` tied items are all other items: prod over i of (others-i)/(tied-i).
    all_others = torch.ones_like(higher)
    for i in range(k):
        left = others - i
        factor = (left / (left + mine)).where(left > 0, 0.0).where(i < slots, 1.0)
        all_others = all_others * factor
    return (1 - all_others).where(slots > 0, 0.0)


def recall_at_k(sim: Tensor, relevant: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Percent Recall@K both ways (``i2t_r{k}``, ``t2i_r{k}``) and their sum ``rsum``; ``sim[image, text]``.

    A query is a hit at K when ANY of its relevant items is within the first K (see the module docstring for
    ties).
    """
    _check_relevance(relevant)
    if sim.shape != relevant.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and relevant {tuple(relevant.shape)} differ in shape")
    by_row = sim.t()
    ranks = {
        "i2t": _best_relevant_rank(lambda a, b: sim[a:b], relevant),
        "t2i": _best_relevant_rank(lambda a, b: by_row[a:b], relevant.t()),
    }
    return _recalls(ranks, ks)


def recall_of_embeddings(
    image_emb: Tensor, text_emb: Tensor, relevant: Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """:func:`recall_at_k` of the similarities ``image_emb @ text_emb.T``, computed a chunk of queries at a
    time: memory grows with a chunk's row (e.g. 1,024 x 25,000 captions), never with the whole matrix."""
    _check_relevance(relevant)
    if relevant.shape != (len(image_emb), len(text_emb)):
        raise ValueError(
            f"relevant {tuple(relevant.shape)} does not match {len(image_emb)} x {len(text_emb)}"
        )
    ranks = {
        "i2t": _best_relevant_rank(lambda a, b: image_emb[a:b] @ text_emb.t(), relevant),
        "t2i": _best_relevant_rank(lambda a, b: text_emb[a:b] @ image_emb.t(), relevant.t()),
    }
    return _recalls(ranks, ks)


def _recalls(ranks: dict[str, Tensor], ks: Sequence[int]) -> dict[str, float]:
    result = {
        f"{direction}_r{k}": 100.0 * _hit_probability(counts, k).mean().item()
        for direction, counts in ranks.items()
        for k in ks
    }
    result["rsum"] = sum(result.values())
    return result


def chance_rsum(relevant: Tensor, ks: Sequence[int] = DEFAULT_KS) -> float:
    """Exact expected ``rsum`` of a uniformly random ranking, for judging how far a model is above chance."""
    _check_relevance(relevant)
    n_img, n_txt = relevant.shape
    per_image = relevant.sum(dim=1, dtype=torch.int32)  # relevant texts of each image
    per_text = relevant.sum(dim=0, dtype=torch.int32)  # relevant images of each text
    return sum(_chance_recall(per_image, n_txt, k) + _chance_recall(per_text, n_img, k) for k in ks)


def _chance_recall(relevant_counts: Tensor, n: int, k: int) -> float:
    """Percent expected Recall@k of queries with these relevant counts, their n candidates shuffled."""
    counts, queries = torch.unique(relevant_counts, return_counts=True)
    total = 0.0
    for m, weight in zip(counts.tolist(), queries.tolist(), strict=True):
        # P(miss) = C(n-m, k) / C(n, k), evaluated as a product so it never builds huge integers.
        miss = 1.0
        for j in range(min(k, n)):
            miss *= max(n - m - j, 0) / (n - j)
        total += weight * (1.0 - miss)
    return 100.0 * total / relevant_counts.numel()


def _check_relevance(relevant: Tensor) -> None:
    """Reject anything but a 2-D bool matrix in which every image and every text has a relevant partner."""
    if relevant.dim() != 2 or relevant.dtype != torch.bool:
        raise ValueError(f"relevant must be a 2-D bool tensor, got {relevant.dtype} {tuple(relevant.shape)}")
    # A query with no relevant item has no defined recall; counting it as a miss would hide a data bug.
    for dim, name in ((1, "image"), (0, "text")):
        missing = (~relevant.any(dim=dim)).nonzero().flatten()
        if missing.numel():
            first = missing[0].item()
            raise ValueError(f"{missing.numel()} {name}(s) have no relevant item, the first at index {first}")
