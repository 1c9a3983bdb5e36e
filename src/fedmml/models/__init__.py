"""Staged encoders, their heads and the task models; :func:`register_backend` adds a user's own encoder."""

from typing import Any


def __getattr__(name: str) -> Any:
    # Deferred: the backends import transformers, which a caller of fedmml.models.staged alone need not.
    if name == "register_backend":
        from fedmml.models.backends import register_backend

        return register_backend
    raise AttributeError(f"module 'fedmml.models' has no attribute {name!r}")
