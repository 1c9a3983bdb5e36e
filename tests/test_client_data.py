"""Clients own their data: shares cut from metadata, folders of their own, and a server that opens no
training file."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fedmml.cli import main
from fedmml.client_data import SharedSplit, open_client_data
from fedmml.config import ConfigError, load_config
from fedmml.data import store
from fedmml.experiment import build_setup
from fedmml.federation import SetupFailed

pytestmark = pytest.mark.slow  # several short training runs and folder copies; `make test-fast` skips it

ROUNDS = "schedules.uniform.rounds=[1, 1, 1]"
TINY = ["run.threads=1", 'run.method="lw"', ROUNDS]

# Paths opened by this process while a test records them (an audit hook cannot be removed, so it stays
# installed and records only while the list is armed).
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], str | Path):
        _opened.append(str(Path(args[0]).resolve()))


sys.addaudithook(_audit)


def _run_args(out: Path, root: Path) -> list[str]:
    """``fedmml run`` of the tiny preset on ``root``, into ``out``."""
    return ["run", "--preset", "tiny", "--quiet", "--out", str(out), "--set", f'data.root="{root}"']


def _local(emoji_root: Path, folders: dict, server_root: Path, *extra: str) -> list[str]:
    roots = ", ".join(json.dumps(r) for r in folders["clients"])
    return [f'data.root="{server_root}"', 'partition.kind="local"', f"data.client_roots=[{roots}]", *extra]


def test_a_share_is_cut_from_metadata_and_only_it_is_decoded(
    emoji_root: Path, tmp_path: Path, monkeypatch
) -> None:
    # A fresh store, so that the client's images are decoded here (into it), and only they.
    cfg = load_config("tiny", [f'data.root="{emoji_root}"', f'data.store_dir="{tmp_path / "store"}"'])
    decoded: list[Path] = []
    decode = store._decode_source

    def counting(path: Path, geometry):
        decoded.append(path)
        return decode(path, geometry)

    monkeypatch.setattr(store, "_decode_source", counting)
    shared = SharedSplit(cfg)
    assert decoded == []  # partitions from the captions JSON alone
    data = open_client_data(cfg, 1, shared)
    assert len(decoded) == len(shared.parts[1]) == len(data.dataset)
    own = {shared.index.file_names[i] for i in shared.parts[1]}
    assert {p.relative_to(emoji_root / "images").as_posix() for p in decoded} == own
    assert data.describe()["num_samples"] == len(own)
    data.dataset[0]  # reading a sample reads the store, not the source
    assert len(decoded) == len(own)


def test_folders_train_exactly_as_the_partition_they_were_written_from(
    emoji_root: Path, client_folders: dict
) -> None:
    shared = build_setup(load_config("tiny", [f'data.root="{emoji_root}"', *TINY])).run_rounds()
    # The server's folder also holds the full training file: the run must never open it.
    server_root = client_folders["server"].parent / "server-with-train"
    shutil.copytree(client_folders["server"], server_root)
    shutil.copyfile(emoji_root / "captions_train.json", server_root / "captions_train.json")
    global _opened
    _opened = []
    try:
        local = build_setup(
            load_config("tiny", [*TINY, *_local(emoji_root, client_folders, server_root)])
        ).run_rounds()
    finally:
        opened, _opened = _opened, None
    assert str((server_root / "captions_train.json").resolve()) not in opened
    assert any(p.endswith("node2/captions_train.json") for p in opened)  # the clients did open theirs
    for a, b in zip(shared, local, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["rsum"] == b["rsum"]
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]


@pytest.mark.parametrize("method", ["e2e", "lw", "prog"])
def test_every_method_runs_on_client_folders_with_a_test_only_server(
    emoji_root: Path, client_folders: dict, tmp_path: Path, method: str, capsys
) -> None:
    assert not (client_folders["server"] / "captions_train.json").exists()
    args = ["run", "--preset", "tiny", "--method", method, "--quiet", "--out", str(tmp_path)]
    for item in _local(emoji_root, client_folders, client_folders["server"], ROUNDS, "run.threads=1"):
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_images"] == 192 and summary["client_samples"] == {"0": 64, "1": 64, "2": 64}
    assert summary["test_images"] == 96 and summary["evaluation"] == "server"
    # The preset's data.limit_train = 192 cut each folder here, not the whole: said, even under --quiet.
    said = " ".join(capsys.readouterr().err.split())
    assert "data.limit_train = 192 limits each client's own folder" in said and "192 samples in all" in said


def test_a_client_whose_folder_is_missing_is_left_out(
    emoji_root: Path, client_folders: dict, tmp_path: Path, capsys
) -> None:
    gone = str(tmp_path / "nowhere")
    roots = ", ".join(
        json.dumps(r) for r in [client_folders["clients"][0], gone, client_folders["clients"][2]]
    )
    overrides = [
        f'data.root="{client_folders["server"]}"',
        'partition.kind="local"',
        f"data.client_roots=[{roots}]",
    ]
    setup = build_setup(load_config("tiny", [*TINY, *overrides]))
    metrics = setup.run_rounds()
    assert all(r["clients"] == [0, 2] for r in metrics)
    why = metrics[0]["setup_failures"]["1"]
    assert why.startswith(f"client 1 cannot use its data folder {gone}") and "\n" not in why
    # Too few clients for federation.min_clients: one line, before any round.
    strict = load_config("tiny", [*TINY, *overrides, "federation.min_clients=3"])
    with pytest.raises(SetupFailed, match="only 2 of 3 clients could be set up"):
        build_setup(strict).run_rounds()
    args = ["run", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "run")]
    for item in [*overrides, "federation.min_clients=3"]:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "only 2 of 3 clients could be set up" in err and "Traceback" not in err


def test_client_roots_must_match_the_clients(client_folders: dict) -> None:
    one = json.dumps(client_folders["clients"][0])
    with pytest.raises(ConfigError, match="lists 2 folders for federation.num_clients = 3"):
        load_config("tiny", ['partition.kind="local"', f"data.client_roots=[{one}, {one}]"])
    with pytest.raises(ConfigError, match="names one folder twice"):
        load_config("tiny", ['partition.kind="local"', f"data.client_roots=[{one}, {one}, {one}]"])
    with pytest.raises(ConfigError, match='only with partition.kind = "local"'):
        load_config("tiny", [f"data.client_roots=[{one}]"])


def test_more_clients_than_samples_is_one_line(emoji_root: Path, tmp_path: Path, capsys) -> None:
    args = _run_args(tmp_path, emoji_root)
    assert main([*args, "--set", "federation.num_clients=100000"]) == 2
    err = capsys.readouterr().err
    assert "cannot split 192 samples across 100000 clients" in err and "Traceback" not in err


def test_an_existing_run_is_never_replaced_silently(emoji_root: Path, tmp_path: Path, capsys) -> None:
    args = _run_args(tmp_path, emoji_root)
    args += ["--set", "schedules.uniform.rounds=[1, 0, 0]"]
    assert main([*args, "--method", "lw"]) == 0
    assert main([*args, "--method", "e2e"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == "lw"
    assert main([*args, "--method", "e2e", "--overwrite"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == "e2e"


def test_federated_evaluation_on_the_clients_own_test_splits(
    emoji_root: Path, client_folders: dict, tmp_path: Path
) -> None:
    # One client holding the whole test split: its local-gallery recall is the whole-split recall.
    one = ["federation.num_clients=1", *TINY]
    server = build_setup(load_config("tiny", [f'data.root="{emoji_root}"', *one])).run_rounds()
    fed_cfg = load_config("tiny", [f'data.root="{emoji_root}"', *one, 'eval.where="federated"'])
    setup = build_setup(fed_cfg)
    assert setup.test is None  # the server opens no data at all
    fed = setup.run_rounds()
    assert [r["rsum"] for r in fed] == pytest.approx([r["rsum"] for r in server], abs=1e-9)
    # Client folders: client 1 has no test split and is left out of evaluation, counted; the others score.
    tested = tmp_path / "tested"
    for cid in (0, 2):
        shutil.copytree(client_folders["clients"][cid], tested / str(cid))
        shutil.copytree(client_folders["server"], tested / str(cid), dirs_exist_ok=True)
    roots = [str(tested / "0"), client_folders["clients"][1], str(tested / "2")]
    overrides = ['partition.kind="local"', f"data.client_roots={json.dumps(roots)}", 'eval.where="federated"']
    metrics = build_setup(load_config("tiny", [*TINY, *overrides])).run_rounds()
    for record in metrics:
        assert record["eval_clients"] == [0, 2] and list(record["eval_skipped_clients"]) == ["1"]
        assert "client 1 has no usable test split" in record["eval_skipped_clients"]["1"]
        assert record["test_images"] == 2 * 96 and 0 <= record["rsum"] <= 600


def _shards(store_dir: Path) -> int:
    return len(list(store_dir.glob("*/*.json")))  # an index per shard, in a folder per image geometry


def test_a_simulation_stores_its_clients_images_at_once_and_each_reads_its_own(
    emoji_root: Path, tmp_path: Path
) -> None:
    # Opened one by one, 12 clients would add 12 shards a split, each sweeping the ones before it; an
    # in-process run stores them all at once: one shard for the training shares, one for the held-out ones.
    sets = [f'data.root="{emoji_root}"', "federation.num_clients=12", 'eval.where="federated"', *TINY]
    setup = build_setup(load_config("tiny", [*sets, f'data.store_dir="{tmp_path / "at-once"}"']))
    assert _shards(tmp_path / "at-once") == 2
    # Each client reads what it would read from a store it made itself, and only its own samples.
    alone = load_config("tiny", [*sets, f'data.store_dir="{tmp_path / "alone"}"'])
    shared = SharedSplit(alone)
    for cid in (0, 7):
        own = open_client_data(alone, cid, shared)
        client = setup.clients[cid]
        assert client.data.describe() == own.describe()
        assert torch.equal(client.dataset[0][0], own.dataset[0][0])
        assert torch.equal(client.data.test[1][0], own.test[1][0])
    assert _shards(tmp_path / "alone") == 4  # the two clients' shares of each split
