"""Datasets, preprocessing and client partitioning; independent of models and federation."""

import hashlib
import json
from typing import Any


class DataError(ValueError):
    """A dataset that cannot be used as given (unparseable, nothing usable left); the message says why."""


def sample_identity(key: str, value: Any, sample_id: Any) -> str:
    """A sample's identity for splits by identity (``data.identity_key``): ``<key>=<value>`` when it has a
    value under ``key``, else its own id."""
    return f"{key}={value}" if value is not None else f"id={sample_id}"


def identity_value(key: str, identity: str) -> str | None:
    """The value under ``key`` that :func:`sample_identity` wrote into ``identity``; None without one."""
    return identity.removeprefix(f"{key}=") if key and identity.startswith(f"{key}=") else None


def fingerprint(*columns: list[Any]) -> str:
    """A short digest of a dataset's samples (ids, files, captions or labels, in order): equal when a client
    would train on the same samples, different when any of them changed."""
    text = json.dumps([[str(v) for v in column] for column in columns])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
