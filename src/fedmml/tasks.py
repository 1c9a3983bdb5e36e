"""Tasks: what data a run loads, how it is spread over clients, and how the global model is scored.

- ``image-text``: COCO-format image-caption data, the contrastive dual encoder, retrieval recall (R@K, rsum)
  over the whole test split, and Fashion-MNIST zero-shot when that package is installed.
- ``image-audio``: ADVANCE-format image + sound pairs, the fused classifier, accuracy and dataset-level
  macro-F1 over the whole test split, with a confusion matrix.

The server, the clients and the engines are task-agnostic; everything task-specific is here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedmml.config import Config, ConfigError
from fedmml.data import fashion_mnist
from fedmml.data.advance import AdvanceDataset, read_classes
from fedmml.data.audio import feature_settings
from fedmml.data.coco import CaptionDataset
from fedmml.data.partition import partition, partition_by_group
from fedmml.evaluation.classification import evaluate_classifier, majority_rate, per_class_f1, plot_confusion
from fedmml.evaluation.scoring import retrieval_chance, retrieval_scores, zeroshot_score
from fedmml.models.multimodal import MultimodalModel

CONFUSION_PNG = "confusion.png"


class Task:
    """One task's data and scoring; see the module docstring."""

    name = ""
    score_key = ""  # the headline metric: a run's final score and what comparisons rank by
    summary_keys: tuple[str, ...] = ()  # metrics of the last evaluation copied into summary.json

    def load_split(self, cfg: Config, split: str, train: bool) -> Dataset:
        """One split of the configured dataset."""
        raise NotImplementedError

    def labels(self, data: Dataset) -> list[str | None]:
        """The label of every sample that a Dirichlet split is over."""
        raise NotImplementedError

    def groups(self, data: Dataset) -> list[str | None]:
        """The group of every sample that a group split is over."""
        raise ConfigError(f"partition.kind = group is not available for task {self.name!r}")

    def partitions(self, cfg: Config, train: Dataset) -> list[list[int]]:
        """Training-sample indices per client."""
        p = cfg.partition
        n = cfg.federation.num_clients
        if p.kind == "group":
            return partition_by_group(self.groups(train), n, seed=cfg.run.seed)
        labels = self.labels(train) if p.kind == "dirichlet" else len(train)
        return partition(
            labels, n, p.kind, alpha=p.alpha, seed=cfg.run.seed, min_partition_size=p.min_partition_size
        )

    def evaluate(self, model: MultimodalModel, test: Dataset, cfg: Config) -> dict[str, Any]:
        """Scores of ``model`` over the whole test split (recorded in the round's metrics)."""
        raise NotImplementedError

    def summarize(
        self, model: MultimodalModel, test: Dataset, cfg: Config, out_dir: Path, final: dict[str, Any]
    ) -> dict[str, Any]:
        """Task-specific summary entries of a finished run (chance levels, extra scores, figures);
        ``final`` is the last evaluation of the same model, so nothing it holds is computed again."""
        raise NotImplementedError


class ImageText(Task):
    """Contrastive image-caption learning, scored by cross-modal retrieval."""

    name = "image-text"
    score_key = "rsum"
    summary_keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")

    def load_split(self, cfg: Config, split: str, train: bool) -> CaptionDataset:
        d = cfg.data
        return CaptionDataset(
            d.root,
            split,
            images_dir=d.images_dir,
            image_size=cfg.model.image.image_size,
            train=train,
            augment=d.augment and train,
            seed=cfg.run.seed,
            limit=d.limit_train if train else d.limit_test,
        )

    def labels(self, data: CaptionDataset) -> list[str | None]:
        return data.labels

    def evaluate(self, model: MultimodalModel, test: CaptionDataset, cfg: Config) -> dict[str, float]:
        pixels = [test[i][0] for i in range(len(test))]
        return retrieval_scores(model, pixels, test.captions, cfg.eval.batch_size, cfg.eval.ks)

    def summarize(
        self, model: MultimodalModel, test: CaptionDataset, cfg: Config, out_dir: Path, final: dict[str, Any]
    ) -> dict[str, Any]:
        summary: dict[str, Any] = {"chance_rsum": retrieval_chance(test.captions, cfg.eval.ks)}
        if cfg.eval.zeroshot and fashion_mnist.available():
            pixels, labels = fashion_mnist.load_test(
                limit=cfg.eval.zeroshot_limit, image_size=cfg.model.image.image_size
            )
            summary["zeroshot_fmnist_top1"] = zeroshot_score(
                model, pixels, labels, fashion_mnist.CLASSES, cfg.eval.batch_size
            )
        return summary


class ImageAudio(Task):
    """Supervised image + sound classification with late fusion (the paper's ADVANCE setting)."""

    name = "image-audio"
    score_key = "accuracy"
    summary_keys = ("accuracy", "macro_f1")

    def load_split(self, cfg: Config, split: str, train: bool) -> AdvanceDataset:
        d = cfg.data
        return AdvanceDataset(
            d.root,
            split,
            image_size=cfg.model.image.image_size,
            settings=feature_settings(d.audio_features, d.audio_frames),
            train=train,
            augment=d.augment and train,
            seed=cfg.run.seed,
            limit=d.limit_train if train else d.limit_test,
            group_key=cfg.partition.group,
        )

    def labels(self, data: AdvanceDataset) -> list[str | None]:
        return list(data.label_names)

    def groups(self, data: AdvanceDataset) -> list[str | None]:
        return data.groups

    def evaluate(self, model: MultimodalModel, test: AdvanceDataset, cfg: Config) -> dict[str, Any]:
        metrics, confusion = evaluate_classifier(model, test, cfg.eval.batch_size)
        scores = {k: metrics[k] for k in ("accuracy", "macro_f1")} | {"test_loss": metrics["loss"]}
        return scores | {"confusion": confusion.tolist()}

    def summarize(
        self, model: MultimodalModel, test: AdvanceDataset, cfg: Config, out_dir: Path, final: dict[str, Any]
    ) -> dict[str, Any]:
        confusion = torch.tensor(final["confusion"])
        title = f"{cfg.run.method}: test split"
        plot_confusion(confusion, test.classes, out_dir / CONFUSION_PNG, title=title)
        return {
            "majority_rate": majority_rate(confusion),
            "per_class_f1": dict(zip(test.classes, per_class_f1(confusion), strict=True)),
            "classes": list(test.classes),
            "confusion": final["confusion"],
        }


TASKS: dict[str, Task] = {t.name: t for t in (ImageText(), ImageAudio())}


def task_for(cfg: Config) -> Task:
    """The task of ``cfg`` (``model.task``)."""
    return TASKS[cfg.model.task]


def resolve_classes(cfg: Config) -> Config:
    """``cfg`` with ``model.num_classes`` taken from the training split's class folders when it is 0."""
    if cfg.model.task != "image-audio" or cfg.model.num_classes:
        return cfg
    classes = read_classes(cfg.data.root)
    if len(classes) < 2:
        raise ConfigError(
            f"found {len(classes)} class folders under {Path(cfg.data.root) / 'train'}; a classifier needs "
            "at least 2 (run `fedmml data prepare tuxpaint`, or point data.root at an ADVANCE-layout folder)"
        )
    return replace(cfg, model=replace(cfg.model, num_classes=len(classes)))
