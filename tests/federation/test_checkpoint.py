"""Atomic checkpoint files: round trip, pruning, latest."""

from pathlib import Path

import torch

from fedmml.federation.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def test_round_trip_and_keep_last(tmp_path: Path) -> None:
    for r in range(1, 5):
        save_checkpoint(tmp_path, r, {"w": torch.full((2,), float(r))}, {"round": r, "rng": [1, 2]}, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["round-000003.safetensors", "round-000004.safetensors"]
    tensors, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state == {"round": 4, "rng": [1, 2]} and torch.equal(tensors["w"], torch.full((2,), 4.0))


def test_leftover_temporary_file_is_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {"round": 1})
    (tmp_path / "round-000002.tmp").write_bytes(b"torn")
    assert latest_checkpoint(tmp_path).name == "round-000001.safetensors"
    assert latest_checkpoint(tmp_path / "missing") is None
