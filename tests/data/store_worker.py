"""A process that opens an image store, for test_store.py: a module of its own so that a spawned process
imports the store alone, not the test module's training stack."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmml.data.store import Geometry, open_store

NAMES = ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "emoji.png", "broken.jpg"]


def open_and_save(folder: str, out: str) -> None:
    """Open (or make) the store of ``folder``'s images and save one stored image to ``out``."""
    store = open_store(Path(folder), NAMES, Geometry(24, True), Path(folder).parent / ".fedmml-store")
    np.save(out, store.read("3.jpg"))
