"""Recall@K, relevance building and chance level for image-text retrieval."""

import itertools
import math

import pytest
import torch

from fedmml.evaluation import retrieval
from fedmml.evaluation.retrieval import build_relevance, chance_rsum, recall_at_k


def brute_force_recall(sim: torch.Tensor, relevant: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Reference by counting: the items tied with a query's best relevant score come in a random order, so a
    hit at K is 1 - C(others, s) / C(tied, s) with s the places left within K (hypergeometric)."""
    out = {}
    for name, s, r in (("i2t", sim, relevant), ("t2i", sim.t(), relevant.t())):
        for k in ks:
            hits = 0.0
            for row in range(s.shape[0]):
                best = max(s[row, j].item() for j in r[row].nonzero().flatten())
                higher = sum(v > best for v in s[row].tolist())
                tied = [bool(r[row, j]) for j, v in enumerate(s[row].tolist()) if v == best]
                slots = k - higher
                if slots > 0:
                    others = tied.count(False)
                    miss = 0.0 if slots > others else math.comb(others, slots) / math.comb(len(tied), slots)
                    hits += 1 - miss
            out[f"{name}_r{k}"] = 100.0 * hits / s.shape[0]
    out["rsum"] = sum(out.values())
    return out


def test_identity_is_perfect():
    result = recall_at_k(torch.eye(20), torch.eye(20, dtype=torch.bool))
    assert set(result) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}
    assert all(result[k] == 100.0 for k in result if k != "rsum")
    assert result["rsum"] == 600.0


def test_reversed_ranking_has_known_recall():
    # Image i scores text i lowest of all 20 texts, so its relevant text has rank 19 both ways.
    n = 20
    sim = -torch.eye(n) + 0.01 * torch.arange(n).float()  # distinct off-diagonal scores, diagonal lowest
    result = recall_at_k(sim, torch.eye(n, dtype=torch.bool), ks=(1, 5, 10, 20))
    assert result["i2t_r1"] == result["i2t_r10"] == result["t2i_r10"] == 0.0
    assert result["i2t_r20"] == result["t2i_r20"] == 100.0
    assert result["rsum"] == 200.0


def test_shifted_ranking_gives_partial_recall():
    # Every image scores the texts in the same decreasing order, so image i's own text has rank i.
    n = 10
    sim = torch.linspace(1, 0, n).repeat(n, 1)
    relevant = torch.eye(n, dtype=torch.bool)
    result = recall_at_k(sim, relevant, ks=(1, 5))
    assert result["i2t_r1"] == 10.0  # only image 0 (relevant text at rank 0)
    assert result["i2t_r5"] == 50.0  # images 0..4
    # Every image scores text j equally: all ten images tie, and a random order puts text j's first 1 in 10.
    assert result["t2i_r1"] == pytest.approx(10.0)


def test_any_relevant_caption_counts_for_image_to_text():
    # Image 0 has captions 0 and 1; only caption 1 is top-ranked, which is still an i2t hit at 1.
    sim = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.3, 0.8]])
    relevant = torch.tensor([[True, True, False], [False, False, True]])
    result = recall_at_k(sim, relevant, ks=(1,))
    assert result["i2t_r1"] == 100.0
    # Caption 0 ranks image 1 (0.2) above image 0 (0.1): a t2i miss; captions 1 and 2 hit.
    assert result["t2i_r1"] == pytest.approx(200 / 3)


def test_duplicate_caption_is_relevant_to_both_images():
    texts, relevant = build_relevance([["Grinning Face", "smile"], ["grinning  face "], ["cat"]])
    assert texts == ["grinning face", "smile", "cat"]
    assert relevant.tolist() == [[True, True, False], [True, False, False], [False, False, True]]
    # Both vendor images of the emoji rank "grinning face" first; either image retrieved first is a hit.
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.0, 0.0, 1.0]])
    result = recall_at_k(sim, relevant, ks=(1,))
    assert result["i2t_r1"] == 100.0
    assert result["t2i_r1"] == pytest.approx(200 / 3)  # "smile" ranks image 1 above image 0


def test_ties_are_ordered_at_random_so_a_collapsed_model_scores_chance():
    # All texts tie: a random order puts the relevant one first 1 time in 4, as a random model would.
    sim = torch.zeros(4, 4)
    result = recall_at_k(sim, torch.eye(4, dtype=torch.bool), ks=(1, 2, 4))
    assert result["i2t_r1"] == result["t2i_r1"] == pytest.approx(25.0)
    assert result["i2t_r2"] == pytest.approx(50.0) and result["i2t_r4"] == pytest.approx(100.0)
    # NaN scores (a model whose weights diverged) tie as the lowest: chance, never a perfect recall.
    result = recall_at_k(torch.full((4, 4), float("nan")), torch.eye(4, dtype=torch.bool), ks=(1,))
    assert result["i2t_r1"] == pytest.approx(25.0)
    # One strictly higher distractor pushes the relevant item to rank 1; a tie with it is a coin toss.
    sim = torch.tensor([[0.5, 0.7], [0.5, 0.5]])
    result = recall_at_k(sim, torch.eye(2, dtype=torch.bool), ks=(1, 2))
    assert result["i2t_r1"] == pytest.approx(25.0) and result["i2t_r2"] == 100.0


@pytest.mark.parametrize("seed", range(3))
def test_agrees_with_brute_force_on_random_matrices(seed):
    gen = torch.Generator().manual_seed(seed)
    n_img = 37
    n_captions = torch.randint(1, 4, (n_img,), generator=gen).tolist()
    # Overlapping caption ids give some captions several relevant images.
    captions = [[f"c{(i * 3 + j) % 80}" for j in range(n_captions[i])] for i in range(n_img)]
    _, relevant = build_relevance(captions)
    # Rounded scores create ties, which exercises the tie rule too.
    sim = (torch.randn(n_img, relevant.shape[1], generator=gen) * 4).round() / 4
    expected = brute_force_recall(sim, relevant)
    assert recall_at_k(sim, relevant) == pytest.approx(expected)


def test_chunking_does_not_change_the_result(monkeypatch):
    import fedmml.evaluation.retrieval as retrieval

    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(50, 70, generator=gen)
    relevant = torch.rand(50, 70, generator=gen) < 0.05
    relevant[torch.arange(50), torch.arange(50)] = True
    relevant[torch.arange(50, 70) % 50, torch.arange(50, 70)] = True
    whole = recall_at_k(sim, relevant)
    monkeypatch.setattr(retrieval, "_CHUNK_ROWS", 7)
    assert recall_at_k(sim, relevant) == whole


def test_queries_without_relevant_items_are_rejected():
    relevant = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="image"):
        recall_at_k(torch.zeros(2, 2), relevant)
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(torch.zeros(2, 3), torch.eye(2, dtype=torch.bool))


def test_chance_rsum_matches_closed_form_and_monte_carlo():
    _, relevant = build_relevance([["a", "b"], ["c"], ["d", "e", "f"], ["a"], ["g"], ["h"]])
    ks = (1, 2, 3)
    exact = chance_rsum(relevant, ks)
    # Closed form for the first image: 2 relevant among 8 texts, P(hit@1) = 2/8.
    assert 1 - math.comb(6, 1) / math.comb(8, 1) == pytest.approx(2 / 8)
    gen = torch.Generator().manual_seed(0)
    trials = [
        recall_at_k(torch.rand(relevant.shape, generator=gen), relevant, ks)["rsum"] for _ in range(3000)
    ]
    assert exact == pytest.approx(sum(trials) / len(trials), rel=0.03)


def test_chance_rsum_enumerates_exactly_on_a_tiny_case():
    # 3 images x 3 texts, identity relevance: average i2t R@1 over all 3! rankings of a row is 1/3.
    relevant = torch.eye(3, dtype=torch.bool)
    i2t_r1 = sum(perm.index(0) < 1 for perm in itertools.permutations(range(3))) / 6
    assert chance_rsum(relevant, ks=(1,)) == pytest.approx(2 * 100 * i2t_r1)


def test_chance_rsum_is_tiny_for_large_sets():
    n = 5000
    relevant = torch.zeros(n, 5 * n, dtype=torch.bool)
    relevant[torch.arange(5 * n) // 5, torch.arange(5 * n)] = True  # COCO-like: 5 captions per image
    assert chance_rsum(relevant) < 2.0


def test_recall_of_embeddings_in_chunks_equals_recall_of_the_whole_matrix(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(23, 8, generator=generator), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(41, 8, generator=generator), dim=1)
    relevant = torch.zeros(23, 41, dtype=torch.bool)
    relevant[torch.arange(41) % 23, torch.arange(41)] = True
    whole = recall_at_k(images @ texts.t(), relevant, ks=(1, 5))
    monkeypatch.setattr(retrieval, "_CHUNK_ROWS", 5)  # several chunks each way, the last one short
    assert retrieval.recall_of_embeddings(images, texts, relevant, ks=(1, 5)) == whole
