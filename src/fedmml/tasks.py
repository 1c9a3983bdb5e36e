"""Tasks: what data a run loads, how it is spread over clients, and how the global model is scored.

- ``image-text``: COCO-format image-caption data, the contrastive dual encoder, retrieval recall (R@K, rsum)
  over the whole test split, and Fashion-MNIST zero-shot when that package is installed.
- ``image-audio``: ADVANCE-format image + sound pairs, the fused classifier, accuracy and dataset-level
  macro-F1 over the whole test split, with a confusion matrix.

The server, the clients and the engines are task-agnostic; everything task-specific is here.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fedmml.config import Config, ConfigError
from fedmml.data import fashion_mnist, missing
from fedmml.data.advance import AdvanceDataset, AdvanceIndex, read_classes
from fedmml.data.audio import feature_settings
from fedmml.data.coco import CaptionDataset, CaptionIndex
from fedmml.data.formats import format_of
from fedmml.data.hf import hf_classes
from fedmml.data.partition import carve, partition, partition_by_group, stratified_subset
from fedmml.data.store import Geometry, ImagesConfig
from fedmml.data.subset import write_advance_subset, write_caption_subset
from fedmml.evaluation.classification import (
    accuracy,
    evaluate_classifier,
    macro_f1,
    majority_rate,
    per_class_f1,
    plot_confusion,
)
from fedmml.evaluation.scoring import retrieval_chance, retrieval_scores, zeroshot_score
from fedmml.models.multimodal import PRESENT, MultimodalModel

CONFUSION_PNG = "confusion.png"


def images_config(cfg: Config) -> ImagesConfig:
    """How this run's datasets get their pixels (``data.store``, ``data.store_dir``); a store is prepared
    with every core of the machine."""
    d = cfg.data
    return ImagesConfig(d.store, Path(d.store_dir) if d.store_dir else None, os.cpu_count() or 1)


def _geometry(cfg: Config, train: bool) -> Geometry:
    """The stored images' geometry of a training (``train``) or held-out split, as its dataset reads them."""
    return Geometry(cfg.model.image.image_size, cfg.data.augment and train)


class Task:
    """One task's data and scoring; see the module docstring."""

    name = ""
    score_key = ""  # the headline metric: a run's final score and what comparisons rank by
    summary_keys: tuple[str, ...] = ()  # metrics of the last evaluation copied into summary.json

    def read_index(self, cfg: Config, root: str, split: str, limit: int) -> Any:
        """The metadata of one split under ``root`` (ids, labels, groups): nothing is decoded. With ``limit``
        > 0, a seeded subset of that many samples, each label keeping its share (``data.limit_seed``)."""
        raise NotImplementedError

    def load_split(
        self,
        cfg: Config,
        split: str,
        train: bool,
        root: str | None = None,
        positions: list[int] | None = None,
        index: Any = None,
    ) -> Dataset:
        """One split of the dataset under ``root`` (default ``data.root``); with ``positions``, only those
        samples of its index are loaded."""
        raise NotImplementedError

    def labels(self, index: Any) -> list[str | None]:
        """The label of every indexed sample that a Dirichlet split is over."""
        raise NotImplementedError

    def store_images(self, cfg: Config, index: Any, positions: list[int], train: bool, root: str) -> None:
        """Put the images of the samples of ``index`` (a split under ``root``; a training split if ``train``)
        at ``positions`` into the image store, where it lacks them."""
        raise NotImplementedError

    def has_split(self, cfg: Config, root: str, split: str) -> bool:
        """Whether the folder ``root`` holds ``split`` in the run's data format."""
        raise NotImplementedError

    def _carves_val(self, cfg: Config, root: str) -> bool:
        return cfg.eval.split == "val" and not self.has_split(cfg, root, cfg.data.val_split)

    def train_index(self, cfg: Config, root: str) -> Any:
        """The training split's metadata under ``root``, less the identities carved out for validation when
        ``eval.split = "val"`` and the folder has no validation split of its own."""
        if not self._carves_val(cfg, root):
            return self.read_index(cfg, root, cfg.data.train_split, cfg.data.limit_train)
        return self._limited(cfg, self._carved(cfg, root, val=False), cfg.data.limit_train)

    def held_out(self, cfg: Config, root: str) -> tuple[str, Any]:
        """(split, metadata) of what a run scores on (``eval.split``): the test split, or the validation split
        — the folder's own, else the identities carved out of its training split. The test split is never
        read for validation. ``data.limit_test`` limits either."""
        d = cfg.data
        if cfg.eval.split == "test":
            return d.test_split, self.read_index(cfg, root, d.test_split, d.limit_test)
        if not self._carves_val(cfg, root):
            index = self.read_index(cfg, root, d.val_split, d.limit_test)
            self._check_disjoint(cfg, root, index)
            return d.val_split, index
        index = self._carved(cfg, root, val=True)
        if not len(index):
            identities = len(set(self.read_index(cfg, root, d.train_split, 0).identities))
            raise ConfigError(
                f"the validation split is empty: data.val_fraction = {d.val_fraction} of the "
                f"{identities} identities of {Path(root) / d.train_split} carved none"
            )
        return d.train_split, self._limited(cfg, index, d.limit_test)

    def _carved(self, cfg: Config, root: str, val: bool) -> Any:
        """The training split's samples inside (``val``) or outside the carved identities. The carve is cut
        from the whole split, before any limit, so that the validation split is the same whatever
        ``data.limit_train`` keeps (a limit would otherwise shrink it too, to a size too small to rank a
        grid's points: 78 samples of Tux Paint at ``limit_train = 1000``), and a limit draws from the rest."""
        whole = self.read_index(cfg, root, cfg.data.train_split, 0)
        carved = set(carve(whole.identities, cfg.data.val_fraction))
        return whole.subset([i for i in range(len(whole)) if (i in carved) == val])

    def _limited(self, cfg: Config, index: Any, limit: int) -> Any:
        keep = stratified_subset(self.labels(index), limit, cfg.data.limit_seed)
        return index if len(keep) == len(index) else index.subset(keep)

    def _check_disjoint(self, cfg: Config, root: str, val: Any) -> None:
        """A validation split of the folder's own shares no identity with its training or test split."""
        for split in (cfg.data.train_split, cfg.data.test_split):
            if self.has_split(cfg, root, split):
                other = self.read_index(cfg, root, split, 0)
                if both := sorted(set(val.identities) & set(other.identities)):
                    shown = ", ".join(both[:5]) + (", ..." if len(both) > 5 else "")
                    raise ConfigError(
                        f"the {cfg.data.val_split} split shares {len(both)} identities with {split}: {shown}"
                    )

    def load_held_out(
        self, cfg: Config, root: str | None = None, positions: list[int] | None = None
    ) -> Dataset:
        """What a run scores on (see :meth:`held_out`), loaded; only ``positions`` of it when given."""
        root = root or cfg.data.root
        split, index = self.held_out(cfg, root)
        chosen = range(len(index)) if positions is None else positions
        return self.load_split(cfg, split, train=False, root=root, positions=chosen, index=index)

    def write_subset(
        self, cfg: Config, index: Any, positions: list[int], dst: Path, split: str, link: bool = True
    ) -> int:
        """The samples of ``index`` at ``positions`` written as split ``split`` of a folder ``dst`` in the
        task's layout (files hard-linked where possible, see :mod:`fedmml.data.subset`); how many."""
        raise NotImplementedError

    def groups(self, index: Any) -> list[str | None]:
        """The group of every indexed sample that a group split is over."""
        raise ConfigError(f"partition.kind = group is not available for task {self.name!r}")

    def partitions(self, cfg: Config, index: Any) -> list[list[int]]:
        """Index positions per client, from metadata only."""
        p = cfg.partition
        n = cfg.federation.num_clients
        try:
            if p.kind == "group":
                return partition_by_group(self.groups(index), n, seed=cfg.run.seed)
            labels = self.labels(index) if p.kind == "dirichlet" else len(index)
            return partition(
                labels, n, p.kind, alpha=p.alpha, seed=cfg.run.seed, min_partition_size=p.min_partition_size
            )
        except ConfigError:
            raise
        except ValueError as err:  # the partitioner's own checks (too many clients, too few samples, ...)
            raise ConfigError(f"partition.kind = {p.kind}: {err}") from None

    def evaluate(self, model: MultimodalModel, test: Dataset, cfg: Config) -> dict[str, Any]:
        """Scores of ``model`` over the whole test split (recorded in the round's metrics)."""
        raise NotImplementedError

    def describe_scores(self, scores: dict[str, Any]) -> str:
        """The task's headline scores in a round's record as text for a progress line ("" when the round
        was not evaluated)."""
        return self._describe(scores) if self.score_key in scores else ""

    def _describe(self, scores: dict[str, Any]) -> str:
        raise NotImplementedError

    def local_scores(self, model: MultimodalModel, test: Dataset, cfg: Config) -> dict[str, Any]:
        """What one client reports of ``model`` on its own held-out split under federated evaluation: enough
        for the server to combine (counts, not finished ratios where exactness needs counts)."""
        raise NotImplementedError

    def combine_scores(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The federated evaluation of the clients' reports, under the same keys as :meth:`evaluate`."""
        raise NotImplementedError

    def summarize(
        self, model: MultimodalModel, test: Dataset | None, cfg: Config, out_dir: Path, final: dict[str, Any]
    ) -> dict[str, Any]:
        """Task-specific summary entries of a finished run (chance levels, extra scores, figures);
        ``final`` is the last evaluation of the same model, so nothing it holds is computed again. ``test``
        is the server's test split, None under federated evaluation."""
        raise NotImplementedError


class ImageText(Task):
    """Contrastive image-caption learning, scored by cross-modal retrieval."""

    name = "image-text"
    score_key = "rsum"
    summary_keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")

    def read_index(self, cfg: Config, root: str, split: str, limit: int) -> CaptionIndex:
        return self._limited(cfg, format_of(cfg, root).read(Path(root), split, cfg), limit)

    def load_split(
        self,
        cfg: Config,
        split: str,
        train: bool,
        root: str | None = None,
        positions: list[int] | None = None,
        index: CaptionIndex | None = None,
    ) -> CaptionDataset:
        d = cfg.data
        root = root or d.root
        if index is None:
            index = self.read_index(cfg, root, split, d.limit_train if train else d.limit_test)
        return CaptionDataset(
            root,
            split,
            images_dir=d.images_dir,
            image_size=cfg.model.image.image_size,
            train=train,
            augment=d.augment and train,
            seed=cfg.run.seed,
            limit=d.limit_train if train else d.limit_test,
            limit_seed=d.limit_seed,
            positions=positions,
            index=index,
            images=images_config(cfg),
        )

    def labels(self, index: CaptionIndex) -> list[str | None]:
        return index.labels

    def store_images(
        self, cfg: Config, index: CaptionIndex, positions: list[int], train: bool, root: str
    ) -> None:
        index.open_images(positions, _geometry(cfg, train), images_config(cfg))

    def has_split(self, cfg: Config, root: str, split: str) -> bool:
        return Path(root).is_dir() and split in format_of(cfg, root).splits(Path(root), cfg)

    def write_subset(
        self, cfg: Config, index: CaptionIndex, positions: list[int], dst: Path, split: str, link: bool = True
    ) -> int:
        return write_caption_subset(
            index, positions, dst, split, cfg.data.images_dir, link, cfg.data.identity_key
        )

    def evaluate(self, model: MultimodalModel, test: CaptionDataset, cfg: Config) -> dict[str, float]:
        return retrieval_scores(model, test.pixels, test.captions, cfg.eval.batch_size, cfg.eval.ks)

    def _describe(self, scores: dict[str, Any]) -> str:
        return f"rsum {scores['rsum']:.1f}  i2t R@1 {scores['i2t_r1']:.1f}  t2i R@1 {scores['t2i_r1']:.1f}"

    def local_scores(self, model: MultimodalModel, test: CaptionDataset, cfg: Config) -> dict[str, Any]:
        # Recall within the client's own gallery: its images against its own captions only.
        return {**self.evaluate(model, test, cfg), "images": len(test)}

    def combine_scores(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        # "Local-gallery recall": the image-weighted mean of every client's R@K over its own gallery. A
        # smaller gallery is easier, so this is not the whole-split recall of server-side evaluation.
        images = sum(p["images"] for p in parts)
        keys = [k for k in parts[0] if k not in ("images", "rsum")]
        scores = {k: sum(p[k] * p["images"] for p in parts) / images for k in keys}
        return {**scores, "rsum": sum(scores.values()), "test_images": images}

    def summarize(
        self,
        model: MultimodalModel,
        test: CaptionDataset | None,
        cfg: Config,
        out_dir: Path,
        final: dict[str, Any],
    ) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        if test is not None:
            summary["chance_rsum"] = retrieval_chance(test.captions, cfg.eval.ks)
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

    def read_index(self, cfg: Config, root: str, split: str, limit: int) -> AdvanceIndex:
        return self._limited(cfg, format_of(cfg, root).read(Path(root), split, cfg), limit)

    def load_split(
        self,
        cfg: Config,
        split: str,
        train: bool,
        root: str | None = None,
        positions: list[int] | None = None,
        index: AdvanceIndex | None = None,
    ) -> AdvanceDataset:
        d = cfg.data
        root = root or d.root
        if index is None:
            index = self.read_index(cfg, root, split, d.limit_train if train else d.limit_test)
        return AdvanceDataset(
            root,
            split,
            image_size=cfg.model.image.image_size,
            settings=feature_settings(d.audio_features, d.audio_frames),
            classes=d.classes or None,
            train=train,
            augment=d.augment and train,
            seed=cfg.run.seed,
            limit=d.limit_train if train else d.limit_test,
            limit_seed=d.limit_seed,
            group_key=cfg.partition.group,
            positions=positions,
            index=index,
            images=images_config(cfg),
        )

    def labels(self, index: AdvanceIndex) -> list[str | None]:
        return list(index.label_names)

    def store_images(
        self, cfg: Config, index: AdvanceIndex, positions: list[int], train: bool, root: str
    ) -> None:
        index.open_images(positions, Path(root), _geometry(cfg, train), images_config(cfg))

    def has_split(self, cfg: Config, root: str, split: str) -> bool:
        return Path(root).is_dir() and split in format_of(cfg, root).splits(Path(root), cfg)

    def write_subset(
        self, cfg: Config, index: AdvanceIndex, positions: list[int], dst: Path, split: str, link: bool = True
    ) -> int:
        keys = (cfg.partition.group, cfg.data.identity_key)
        return write_advance_subset(index, positions, dst, split, link, *keys)

    def groups(self, index: AdvanceIndex) -> list[str | None]:
        return index.groups

    def evaluate(self, model: MultimodalModel, test: AdvanceDataset, cfg: Config) -> dict[str, Any]:
        metrics, confusion = evaluate_classifier(model, test, cfg.eval.batch_size)
        scores = {k: metrics[k] for k in ("accuracy", "macro_f1")} | {"test_loss": metrics["loss"]}
        return scores | {"confusion": confusion.tolist()}

    def _describe(self, scores: dict[str, Any]) -> str:
        return f"accuracy {scores['accuracy']:.1f}  macro-F1 {scores['macro_f1']:.1f}"

    def local_scores(self, model: MultimodalModel, test: AdvanceDataset, cfg: Config) -> dict[str, Any]:
        scores = self.evaluate(model, test, cfg)
        return {"confusion": scores["confusion"], "loss_sum": scores["test_loss"] * len(test)}

    def combine_scores(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        # Summed confusion matrices give exactly the dataset-level accuracy and macro-F1 of the union of the
        # clients' test splits (averaging the clients' F1 scores would not).
        confusion = sum(torch.tensor(p["confusion"]) for p in parts)
        samples = int(confusion.sum())
        return {
            "accuracy": accuracy(confusion),
            "macro_f1": macro_f1(confusion),
            "test_loss": sum(p["loss_sum"] for p in parts) / samples,
            "confusion": confusion.tolist(),
            "test_images": samples,
        }

    def summarize(
        self,
        model: MultimodalModel,
        test: AdvanceDataset | None,
        cfg: Config,
        out_dir: Path,
        final: dict[str, Any],
    ) -> dict[str, Any]:
        confusion = torch.tensor(final["confusion"])
        classes = cfg.data.classes
        where = "test split" if test is not None else "the clients' test splits"
        plot_confusion(confusion, classes, out_dir / CONFUSION_PNG, title=f"{cfg.run.method}: {where}")
        summary = {
            "majority_rate": majority_rate(confusion),
            "per_class_f1": dict(zip(classes, per_class_f1(confusion), strict=True)),
            "classes": list(classes),
            "confusion": final["confusion"],
        }
        conditions = missing.robustness_conditions(cfg)
        if conditions and test is not None:
            summary["missing_test"] = {
                name: self._score_missing(model, test, cfg, modality, rate)
                for name, (modality, rate) in conditions.items()
            }
        return summary

    def _score_missing(
        self, model: MultimodalModel, test: AdvanceDataset, cfg: Config, modality: str, rate: float
    ) -> dict[str, float]:
        """Accuracy and macro-F1 when a seeded ``rate`` of the test samples lack ``modality``."""
        present = missing.held_out_presence(cfg, modality, rate, len(test))
        loader = DataLoader(test, batch_size=cfg.eval.batch_size, collate_fn=test.collate)
        batches = (
            {
                **batch,
                PRESENT: {m: torch.from_numpy(p[i : i + len(batch["labels"])]) for m, p in present.items()},
            }
            for batch, i in zip(loader, range(0, len(test), cfg.eval.batch_size), strict=True)
        )
        metrics, _ = evaluate_classifier(model, batches)
        return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


TASKS: dict[str, Task] = {t.name: t for t in (ImageText(), ImageAudio())}


def task_for(cfg: Config) -> Task:
    """The task of ``cfg`` (``model.task``)."""
    return TASKS[cfg.model.task]


def resolve_classes(cfg: Config) -> Config:
    """``cfg`` with ``data.classes`` (label order) and ``model.num_classes`` filled in for image-audio.

    Every client must map class names to the same labels, so the names travel in the config: given as
    ``data.classes``, else the class folders of ``data.root``'s training split, else of its test split (a
    server that holds only the test split). Clients never decide them from their own folders.
    """
    if cfg.model.task != "image-audio":
        return cfg
    classes = list(cfg.data.classes)
    root = Path(cfg.data.root)
    if not classes and root.is_dir() and format_of(cfg, root).name == "hf":
        classes = hf_classes(root, cfg)
    if not classes:
        classes = read_classes(root, cfg.data.train_split) or read_classes(root, cfg.data.test_split)
    if len(classes) < 2:
        raise ConfigError(
            f"found {len(classes)} class folders under {root / cfg.data.train_split} and "
            f"{root / cfg.data.test_split}; a classifier needs at least 2 (set data.classes, run "
            "`fedmml data prepare tuxpaint`, or point data.root at an ADVANCE-layout folder)"
        )
    if cfg.model.num_classes not in (0, len(classes)):
        raise ConfigError(f"model.num_classes = {cfg.model.num_classes} but there are {len(classes)} classes")
    return replace(
        cfg, data=replace(cfg.data, classes=classes), model=replace(cfg.model, num_classes=len(classes))
    )
