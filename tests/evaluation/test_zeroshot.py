"""Zero-shot classification accuracy and prompt construction."""

import pytest
import torch
import torch.nn.functional as F

from fedmml.evaluation.zeroshot import DEFAULT_TEMPLATES, class_embeddings, prompts, zero_shot_accuracy


def test_perfect_embeddings_score_100():
    classes = torch.eye(4, 8)
    labels = torch.tensor([0, 1, 2, 3, 2, 1])
    images = 3.0 * classes[labels] + 0.01  # scale must not matter: embeddings are normalised inside
    assert zero_shot_accuracy(images, classes, labels) == 100.0


def test_accuracy_counts_wrong_predictions():
    classes = torch.eye(3)
    images = torch.eye(3)[[0, 1, 2, 0]]
    assert zero_shot_accuracy(images, classes, torch.tensor([0, 1, 0, 0])) == 75.0


def test_prompt_ensembling_averages_unit_prompts():
    # Class 0's second prompt has a huge norm: averaging raw embeddings would let it dominate and lose the
    # image to class 1; averaging unit prompts weighs both templates equally and classifies it correctly.
    image = torch.tensor([[1.0, 0.3]])
    class0 = torch.tensor([[1.0, 0.0], [0.0, 100.0]])
    class1 = torch.tensor([[1.0, -0.3], [1.0, -0.3]])
    emb = torch.stack([class0, class1])  # [C=2, P=2, D=2]
    raw_mean = torch.stack([class0.mean(0), class1.mean(0)])
    assert zero_shot_accuracy(image, raw_mean, torch.tensor([0])) == 0.0
    assert zero_shot_accuracy(image, emb, torch.tensor([0])) == 100.0
    ensembled = class_embeddings(emb)
    assert torch.allclose(ensembled[0], F.normalize(torch.tensor([1.0, 1.0]), dim=0))
    assert torch.allclose(ensembled.norm(dim=-1), torch.ones(2))


def test_prompts_are_class_major_and_spoken():
    texts = prompts(["T-shirt/top", "Ankle Boot"], ("a photo of a {}.", "an icon of a {}."))
    assert texts == [
        "a photo of a t-shirt or top.",
        "an icon of a t-shirt or top.",
        "a photo of a ankle boot.",
        "an icon of a ankle boot.",
    ]
    assert len(prompts(["cat"])) == len(DEFAULT_TEMPLATES)


def test_mismatched_labels_are_rejected():
    with pytest.raises(ValueError):
        zero_shot_accuracy(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1]))
