"""A client's training data, and nothing else.

Two sources, one interface (:class:`ClientData`):

- a share of one shared dataset (``partition.kind`` = iid | dirichlet | group), for simulation: the partition
  is computed from the split's metadata (ids, labels, groups), and the client decodes only its own samples;
- a whole folder of the client's own in the task's layout (``partition.kind = "local"``): the folder is
  ``data.client_roots[cid]`` in simulation, or the ``data-root`` a deployed node names in its node config.

Both give the same dataset for the same samples (same order, same seeded draws), so a partition written out
as folders trains exactly as the partition itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from fedmml.config import Config, ConfigError
from fedmml.data import DataError
from fedmml.tasks import task_for


class ClientDataError(DataError):
    """A client cannot open its training data; the message names the client and the path, on one line."""


@dataclass
class ClientData:
    """A client's training samples (and, under federated evaluation, its held-out samples), and what it tells
    the server about them at set-up."""

    dataset: Dataset
    source: str  # the folder or shared split the samples were read from
    source_skipped: dict[str, int]  # malformed entries in that source's metadata (counted once per source)
    test: Dataset | None = None  # the client's own held-out split (eval.where = "federated")
    test_missing: str = ""  # why it has none

    def describe(self) -> dict[str, Any]:
        """Sizes, skip counts and a digest of which samples these are (a resumed run checks that they did not
        change): what the server may know of a client's data."""
        described = {
            "num_samples": len(self.dataset),
            "skipped": dict(self.dataset.skipped),
            # Which clients share a source (its malformed entries count once), without its path.
            "source": hashlib.sha256(self.source.encode()).hexdigest()[:16],
            "source_skipped": dict(self.source_skipped),
            "test_samples": len(self.test) if self.test is not None else 0,
        }
        if hasattr(self.dataset, "fingerprint"):
            described["fingerprint"] = self.dataset.fingerprint()
        return described


class SharedSplit:
    """One shared training split and its partition over clients, from metadata only; the dataset lies under
    ``root`` (a node's own copy), else under ``data.root``."""

    def __init__(self, cfg: Config, root: str | None = None) -> None:
        self.cfg = cfg
        self.root = root or cfg.data.root
        task = task_for(cfg)
        self.source = str(Path(self.root) / cfg.data.train_split)
        try:
            self.index = task.train_index(cfg, self.root)
        except (OSError, DataError) as err:
            raise ClientDataError(f"shared training split {self.source}: {err}") from None
        self.parts = task.partitions(cfg, self.index)
        self.test_split, self.test_index, self.test_parts = "", None, []
        if cfg.eval.where == "federated":
            # Every client also holds a share of the held-out split (eval.split), cut the same way, to score
            # the model on.
            self.test_split, self.test_index = task.held_out(cfg, self.root)
            self.test_parts = task.partitions(cfg, self.test_index)

    def store_images(self, cids: Iterable[int]) -> None:
        """Put the images of clients ``cids``, the ones this process will open, into the image store at once
        (one shard, decoded by every core). Opened one by one, each client would add a shard of its own,
        decoded in this process alone, and sweep and re-read every shard before it under the store's lock:
        setup quadratic in the clients (minutes for 1,392 emoji clients of 2 images)."""
        task = task_for(self.cfg)
        cids = list(cids)
        splits = [(self.index, self.parts, True)]
        if self.test_index is not None:
            splits.append((self.test_index, self.test_parts, False))
        try:
            for index, parts, train in splits:
                positions = sorted({i for cid in cids for i in parts[cid]})
                task.store_images(self.cfg, index, positions, train, self.root)
        except (OSError, DataError):
            pass  # each client meets the same error opening its share, and says so in a line of its own

    def client(self, cid: int) -> ClientData:
        """Client ``cid``'s share, decoded (only its own samples)."""
        task = task_for(self.cfg)
        split = self.cfg.data.train_split
        dataset = task.load_split(
            self.cfg, split, train=True, root=self.root, positions=self.parts[cid], index=self.index
        )
        data = ClientData(dataset, self.source, self.index.skipped)
        if self.test_index is not None:
            held_out = self.test_parts[cid]
            data.test = task.load_split(
                self.cfg, self.test_split, False, root=self.root, positions=held_out, index=self.test_index
            )
        return data


def local_folder(cfg: Config, cid: int, root: str) -> ClientData:
    """Client ``cid``'s own folder, whole; a missing, empty or malformed folder is a one-line error."""
    task = task_for(cfg)
    split = cfg.data.train_split
    try:
        index = task.train_index(cfg, root)
        dataset = task.load_split(cfg, split, train=True, root=root, positions=range(len(index)), index=index)
    except (OSError, DataError) as err:
        raise ClientDataError(f"client {cid} cannot use its data folder {root}: {err}") from None
    data = ClientData(dataset, str(Path(root).resolve()), index.skipped)
    if cfg.eval.where == "federated":
        # A folder without a held-out split still trains; it is left out of evaluation, and counted.
        try:
            data.test = task.load_held_out(cfg, root)
        except (OSError, DataError, ConfigError) as err:
            data.test_missing = f"client {cid} has no usable {cfg.eval.split} split in {root}: {err}"
    return data


def open_client_data(
    cfg: Config, cid: int, shared: SharedSplit | None, root: str | None = None
) -> ClientData:
    """Client ``cid``'s training data: its own folder (``root``, else ``data.client_roots[cid]``) under
    ``partition.kind = "local"``, else its share of ``shared`` (see :func:`source_of`)."""
    if cfg.partition.kind == "local":
        roots = cfg.data.client_roots
        root = root or (roots[cid] if cid < len(roots) else None)
        if not root:
            raise ConfigError(
                f'client {cid} has no data folder: partition.kind = "local" needs data.client_roots, or a '
                "data-root in the node's config"
            )
        return local_folder(cfg, cid, root)
    if shared is None:
        raise ValueError(f"partition.kind = {cfg.partition.kind!r} needs the shared split from source_of")
    return shared.client(cid)


def source_of(cfg: Config, root: str | None = None) -> SharedSplit | None:
    """What the clients of this process cut their data from: the shared split (under ``root`` when a node
    keeps its copy elsewhere than ``data.root``), or None when each client has a folder of its own."""
    return None if cfg.partition.kind == "local" else SharedSplit(cfg, root)
