"""A dataset written out as one folder per node (``fedmml data split``): the partition a simulation of the
same config uses, for a deployment in which each node holds only its own data and the server none of it.

``<out>/node<i>/`` holds client i's share of the training split (after ``data.limit_train``, as a
simulation cuts it) and, under ``eval.where = "federated"``, its share of the held-out split;
``<out>/server/`` holds what the server scores on: the whole test split and, under ``eval.split = "val"``,
the validation split (the dataset's own, else the identities carved out of its training split, written as
``data.val_split``). Files are hard-linked where the file system allows, so a split costs no second copy
of the images (and a node folder's files are the source's: edit neither in place, or split with --copy).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmml.client_data import SharedSplit
from fedmml.config import Config, ConfigError
from fedmml.tasks import task_for

SPLIT_RECORD = "split.json"


def split_for_nodes(cfg: Config, nodes: int, out: Path, link: bool = True) -> dict[str, Any]:
    """Write ``cfg``'s dataset (``data.root``) as ``nodes`` node folders and a server folder under ``out``
    (which must be new or empty); what was written, also saved as ``out/split.json``."""
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, not {nodes}")
    if cfg.partition.kind == "local":
        raise ConfigError(
            'partition.kind = "local" has nothing to split: each client already has a folder of its own'
        )
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty: give a new folder")
    cfg = replace(cfg, federation=replace(cfg.federation, num_clients=nodes))
    task = task_for(cfg)
    shared = SharedSplit(cfg)
    d = cfg.data
    held_out_as = d.val_split if cfg.eval.split == "val" else d.test_split
    written: dict[str, Any] = {"root": str(Path(d.root).resolve()), "nodes": []}
    for cid, part in enumerate(shared.parts):
        folder = out / f"node{cid}"
        node = {
            "folder": str(folder),
            "train": task.write_subset(cfg, shared.index, part, folder, d.train_split, link),
        }
        if shared.test_index is not None:
            share = shared.test_parts[cid]
            node[held_out_as] = task.write_subset(cfg, shared.test_index, share, folder, held_out_as, link)
        written["nodes"].append(node)
    server = out / "server"
    written["server"] = {"folder": str(server)}
    if task.has_split(cfg, d.root, d.test_split):
        test = task.read_index(cfg, d.root, d.test_split, 0)
        written["server"]["test"] = task.write_subset(cfg, test, range(len(test)), server, d.test_split, link)
    if cfg.eval.split == "val":
        # The whole validation split: the server's data.limit_test draws from it as it would from the source.
        _, val = task.held_out(replace(cfg, data=replace(d, limit_test=0)), d.root)
        written["server"]["val"] = task.write_subset(cfg, val, range(len(val)), server, d.val_split, link)
    written |= {
        "preset": cfg.preset,
        "partition": {"kind": cfg.partition.kind, "alpha": cfg.partition.alpha, "seed": cfg.run.seed},
        "limit_train": d.limit_train,
    }
    (out / SPLIT_RECORD).write_text(json.dumps(written, indent=1))
    return written
