"""Classification metrics worked out by hand, dataset- vs batch-level F1, whole-test-set evaluation, plots."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fedmml.evaluation.classification import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    evaluate_classifier,
    macro_f1,
    majority_rate,
    per_class_f1,
    plot_confusion,
)

# 12 samples, 4 classes. Rows = true class, columns = predicted:
#   true 0: 5 right, 1 called class 1
#   true 1: 3 right, 2 called class 0, 1 called class 2
#   class 2 is predicted once but never true; class 3 appears nowhere.
LABELS = [0] * 6 + [1] * 6
PREDS = [0] * 5 + [1] + [1] * 3 + [0, 0] + [2]
CONFUSION = [[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_confusion_matrix():
    assert confusion_matrix(LABELS, PREDS, 4).tolist() == CONFUSION
    assert confusion_matrix(torch.tensor(LABELS), torch.tensor(PREDS), 4).tolist() == CONFUSION


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="one prediction per label"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_metrics_by_hand():
    confusion = confusion_matrix(LABELS, PREDS, 4)
    # F1 = 2TP / (2TP + FP + FN):
    #   class 0: TP 5, FP 2, FN 1 -> 10/13;  class 1: TP 3, FP 1, FN 3 -> 6/10;
    #   class 2: TP 0, FP 1, FN 0 -> 0;      class 3: absent from labels and predictions -> no F1.
    f1 = per_class_f1(confusion)
    assert f1[0] == pytest.approx(100 * 10 / 13)
    assert f1[1] == pytest.approx(60.0)
    assert f1[2] == 0.0
    assert f1[3] is None
    assert macro_f1(confusion) == pytest.approx(100 * (10 / 13 + 0.6 + 0.0) / 3)
    assert accuracy(confusion) == pytest.approx(100 * 8 / 12)
    assert majority_rate(confusion) == pytest.approx(50.0)  # 6 of 12 labels are class 0 (and 6 class 1)

    metrics = classification_metrics(LABELS, PREDS, 4)
    assert metrics["accuracy"] == pytest.approx(100 * 8 / 12)
    assert metrics["macro_f1"] == pytest.approx(45.641025641)
    assert metrics["per_class_f1"] == f1
    assert metrics["num_samples"] == 12


def test_majority_rate_of_an_imbalanced_set():
    assert majority_rate(confusion_matrix([2, 2, 2, 0], [0, 0, 0, 0], 3)) == pytest.approx(75.0)


def test_dataset_level_f1_differs_from_batch_averaged():
    # A class-ordered test set in batches of two (as the reference's loader was):
    #   batch 1: labels [0, 0], preds [0, 0] -> macro-F1 100 (only class 0 present)
    #   batch 2: labels [1, 1], preds [1, 0] -> class 0: 0, class 1: 2/3 -> macro-F1 33.3
    # Batch average: 66.7. Whole set: class 0 TP 2, FP 1 -> 4/5; class 1 TP 1, FN 1 -> 2/3 -> 73.3.
    labels, preds = [0, 0, 1, 1], [0, 0, 1, 0]
    batches = [macro_f1(confusion_matrix(labels[i : i + 2], preds[i : i + 2], 2)) for i in (0, 2)]
    assert batches == pytest.approx([100.0, 100 / 3])
    assert sum(batches) / 2 == pytest.approx(200 / 3)
    assert macro_f1(confusion_matrix(labels, preds, 2)) == pytest.approx(100 * (0.8 + 2 / 3) / 2)


def test_empty_test_set_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [], 3)


class LookupClassifier(nn.Module):
    """Predicts the class stored in the batch's "answer" field; counts forward passes and grad mode."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Linear(1, 1)
        self.calls: list[tuple[bool, bool]] = []

    def logits(self, batch: dict) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return 10.0 * nn.functional.one_hot(batch["answer"], self.num_classes).float()


class PairDataset(Dataset):
    def __init__(self, labels: list[int], preds: list[int]) -> None:
        self.items = list(zip(labels, preds, strict=True))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.items[i]

    @staticmethod
    def collate(items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        labels, answers = zip(*items, strict=True)
        return {"labels": torch.tensor(labels), "answer": torch.tensor(answers)}


@pytest.mark.parametrize("as_loader", [False, True])
def test_evaluate_classifier_scores_the_whole_set(as_loader):
    model = LookupClassifier(4).train()
    dataset = PairDataset(LABELS, PREDS)
    data = [PairDataset.collate(dataset.items[i : i + 5]) for i in range(0, 12, 5)] if as_loader else dataset
    metrics, confusion = evaluate_classifier(model, data, batch_size=5, device="cpu")
    assert confusion.tolist() == CONFUSION
    assert metrics["accuracy"] == pytest.approx(100 * 8 / 12)
    assert metrics["macro_f1"] == pytest.approx(45.641025641)
    assert metrics["loss"] > 0
    assert len(model.calls) == 3 and all(call == (False, False) for call in model.calls)
    assert model.training  # mode restored


def test_plot_confusion_writes_png(tmp_path):
    names = ["airport", "beach", "bridge", "farmland", "forest", "grassland", "harbour", "lake"]
    names += ["orchard", "residential", "sparse shrub land", "sports land", "train station"]
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 13, (300,), generator=g)
    preds = torch.where(torch.rand(300, generator=g) < 0.6, labels, torch.randint(0, 13, (300,), generator=g))
    path = plot_confusion(confusion_matrix(labels, preds, 13), names, tmp_path / "plots" / "confusion.png")
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="class names"):
        plot_confusion(confusion_matrix(labels, preds, 13), names[:3], tmp_path / "bad.png")
