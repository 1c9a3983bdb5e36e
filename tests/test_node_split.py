"""`fedmml data split`: a dataset written out as per-node folders trains exactly as the partition itself."""

import json
import os
from pathlib import Path

import pytest

from fedmml.cli import main
from fedmml.client_data import SharedSplit, local_folder
from fedmml.config import ConfigError, load_config
from fedmml.node_split import split_for_nodes
from fedmml.tasks import resolve_classes, task_for


def _same_shares(cfg, written: dict) -> None:
    """Every node folder holds exactly its simulated share (and its share of the held-out split)."""
    shared = SharedSplit(cfg)
    for cid, node in enumerate(written["nodes"]):
        simulated = shared.client(cid)
        own = local_folder(cfg, cid, node["folder"])
        assert own.dataset.fingerprint() == simulated.dataset.fingerprint()
        assert len(own.dataset) == len(simulated.dataset) == node["train"]
        if simulated.test is not None:
            assert own.test is not None and own.test.fingerprint() == simulated.test.fingerprint()


def test_node_folders_hold_the_simulated_shares_of_image_audio_data(
    tuxpaint_root: Path, tmp_path: Path
) -> None:
    cfg = resolve_classes(load_config("tiny-av", [f'data.root="{tuxpaint_root}"']))
    written = split_for_nodes(cfg, 3, tmp_path / "split")
    _same_shares(cfg, written)
    for node in written["nodes"]:  # every node names every class, holding samples of it or not
        assert (
            sorted(p.name for p in (Path(node["folder"]) / "train" / "vision").iterdir()) == cfg.data.classes
        )
    # The server's folder scores on the same test samples as the source.
    task = task_for(cfg)
    server = written["server"]["folder"]
    source_test = task.load_split(cfg, "test", train=False)
    assert task.load_split(cfg, "test", train=False, root=server).fingerprint() == source_test.fingerprint()


def test_held_out_shares_and_a_carved_validation_split_are_written(emoji_root: Path, tmp_path: Path) -> None:
    overrides = [f'data.root="{emoji_root}"', 'eval.where="federated"', 'eval.split="val"']
    cfg = load_config("tiny", overrides)
    written = split_for_nodes(cfg, 3, tmp_path / "split")
    assert all(node["val"] > 0 for node in written["nodes"])
    _same_shares(cfg, written)
    # The server gets the carved identities as a validation split of its own (and the test split).
    task = task_for(cfg)
    server = written["server"]["folder"]
    assert written["server"]["val"] > 0 and written["server"]["test"] > 0
    _, carved = task.held_out(cfg, str(emoji_root))
    _, own = task.held_out(cfg, server)
    assert own.image_ids == carved.image_ids


def test_the_command_links_the_files_and_names_the_deploy_command(
    emoji_root: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "split"
    assert (
        main(["data", "split", str(emoji_root), "--nodes", "2", "--out", str(out), "--preset", "tiny"]) == 0
    )
    shown = capsys.readouterr().out
    assert f"--node-data {out / 'node0'} {out / 'node1'} --set data.root={out / 'server'}" in " ".join(
        shown.split()
    )
    record = json.loads((out / "split.json").read_text())
    assert sum(node["train"] for node in record["nodes"]) == 192  # the tiny preset's data.limit_train
    captions = json.loads((out / "node0" / "captions_train.json").read_text())
    first = captions["images"][0]["file_name"]
    if os.stat(out / "node0").st_dev == os.stat(emoji_root).st_dev:  # hard links need one file system
        assert (
            os.stat(out / "node0" / "images" / first).st_ino == os.stat(emoji_root / "images" / first).st_ino
        )
    # A folder that already holds something is refused in one line.
    assert main(["data", "split", str(emoji_root), "--nodes", "2", "--out", str(out)]) == 2
    assert "is not empty" in "".join(capsys.readouterr())


def test_a_local_partition_has_nothing_to_split(emoji_root: Path, tmp_path: Path) -> None:
    roots = 'data.client_roots=["a", "b", "c"]'
    cfg = load_config("tiny", [f'data.root="{emoji_root}"', 'partition.kind="local"', roots])
    with pytest.raises(ConfigError, match="nothing to split"):
        split_for_nodes(cfg, 2, tmp_path)
