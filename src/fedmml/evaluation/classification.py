"""Classification metrics over a whole test set: confusion matrix, accuracy, dataset-level macro-F1, plots.

Every metric is computed from all test predictions at once. The reference code averaged torchmetrics'
"macro" scores over batches of a class-ordered test loader, where most batches hold one class, so its
numbers were not dataset-level macro metrics; nothing here is averaged over batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

IntsLike = torch.Tensor | Sequence[int]


def confusion_matrix(labels: IntsLike, preds: IntsLike, num_classes: int) -> torch.Tensor:
    """Counts [num_classes, num_classes]: row = true class, column = predicted class."""
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    preds = torch.as_tensor(preds, dtype=torch.long).flatten().cpu()
    if labels.shape != preds.shape:
        raise ValueError(
            f"need one prediction per label: {labels.numel()} labels, {preds.numel()} predictions"
        )
    for name, values in (("labels", labels), ("predictions", preds)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes}), got {int(values.min())}..{int(values.max())}"
            )
    counts = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def accuracy(confusion: torch.Tensor) -> float:
    """Percent of samples on the diagonal."""
    total = int(confusion.sum())
    if total == 0:
        raise ValueError("accuracy of an empty test set")
    return 100.0 * int(confusion.diagonal().sum()) / total


def per_class_f1(confusion: torch.Tensor) -> list[float | None]:
    """F1 of each class in percent: 2TP / (2TP + FP + FN), from the whole confusion matrix.

    Zero-division convention: a class that is neither a true label nor a prediction anywhere in the test set
    (2TP + FP + FN = 0) has no F1 and gets ``None``; a class that appears on only one side has F1 0.
    """
    confusion = confusion.double()
    tp = confusion.diagonal()
    fp = confusion.sum(dim=0) - tp
    fn = confusion.sum(dim=1) - tp
    denominator = 2 * tp + fp + fn
    return [None if d == 0 else 100.0 * float(2 * t / d) for t, d in zip(tp, denominator, strict=True)]


def macro_f1(confusion: torch.Tensor) -> float:
    """Dataset-level macro-F1 in percent: the mean per-class F1 over classes in the labels or predictions.

    Classes absent from both are left out of the mean (see :func:`per_class_f1`) rather than counted as 0 or
    100, so a test split that lacks a class is scored on the classes it has.
    """
    scores = [f for f in per_class_f1(confusion) if f is not None]
    if not scores:
        raise ValueError("macro-F1 of an empty test set")
    return sum(scores) / len(scores)


def majority_rate(confusion: torch.Tensor) -> float:
    """Percent of test samples in the most common true class: the accuracy of always predicting it."""
    return 100.0 * int(confusion.sum(dim=1).max()) / int(confusion.sum())


def classification_metrics(labels: IntsLike, preds: IntsLike, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1, majority rate (percent), per-class F1 (percent or None) and the sample count."""
    confusion = confusion_matrix(labels, preds, num_classes)
    return {
        "accuracy": accuracy(confusion),
        "macro_f1": macro_f1(confusion),
        "majority_rate": majority_rate(confusion),
        "per_class_f1": per_class_f1(confusion),
        "num_samples": int(confusion.sum()),
    }


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    data: Dataset | Iterable[dict[str, Any]],
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics and confusion matrix of a classifier (anything with ``logits(batch)``) on a whole test set.

    ``data`` is a map-style dataset (batched here with its ``collate`` if it has one, in order) or any
    iterable of dict batches with ``"labels"``. The metrics add ``loss``: the cross-entropy summed over every
    sample, then divided by their number. The model's device and train/eval mode are restored afterwards.
    """
    if isinstance(data, Dataset):
        data = DataLoader(
            data, batch_size=batch_size, shuffle=False, collate_fn=getattr(data, "collate", None)
        )
    was_training = model.training
    home = next(model.parameters()).device
    model.to(device or home).eval()
    labels, preds, loss_sum = [], [], 0.0
    try:
        for batch in data:
            logits = model.logits(batch)
            target = batch["labels"].to(logits.device)
            loss_sum += float(F.cross_entropy(logits.float(), target, reduction="sum"))
            labels.append(target.cpu())
            preds.append(logits.argmax(dim=1).cpu())
    finally:
        model.to(home).train(was_training)
    if not labels:
        raise ValueError("cannot evaluate on an empty test set")
    labels_all, preds_all = torch.cat(labels), torch.cat(preds)
    num_classes = logits.shape[1]
    metrics = classification_metrics(labels_all, preds_all, num_classes)
    metrics["loss"] = loss_sum / len(labels_all)
    return metrics, confusion_matrix(labels_all, preds_all, num_classes)


def plot_confusion(
    confusion: torch.Tensor, class_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Write the confusion matrix as a PNG: counts in the cells, colours normalised per true class (row)."""
    # Figure without pyplot: no global backend switch and no GUI, safe in servers and worker processes.
    from matplotlib.figure import Figure

    counts = confusion.cpu().long()
    n = len(class_names)
    if tuple(counts.shape) != (n, n):
        raise ValueError(f"confusion is {tuple(counts.shape)} but there are {n} class names")
    rows = counts.sum(dim=1, keepdim=True).clamp(min=1)
    shares = (counts.double() / rows).numpy()
    side = 2.5 + 0.55 * n
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    fontsize = 9 if n <= 10 else 7
    for i in range(n):
        for j in range(n):
            # Zeros stay blank so that the few off-diagonal errors stand out in a 13-class matrix.
            if counts[i, j]:
                # Dark text on light cells, white on dark ones, so every count stays readable.
                colour = "white" if shares[i, j] > 0.5 else "black"
                ax.text(
                    j, i, str(int(counts[i, j])), ha="center", va="center", color=colour, fontsize=fontsize
                )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
