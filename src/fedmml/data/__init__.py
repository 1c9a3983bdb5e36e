"""Datasets, preprocessing and client partitioning; independent of models and federation."""

import hashlib
import json
from typing import Any


class DataError(ValueError):
    """A dataset that cannot be used as given (unparseable, nothing usable left); the message says why."""


def fingerprint(*columns: list[Any]) -> str:
    """A short digest of a dataset's samples (ids, files, captions or labels, in order): equal when a client
    would train on the same samples, different when any of them changed."""
    text = json.dumps([[str(v) for v in column] for column in columns])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
