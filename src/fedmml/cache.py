"""Where fedmml keeps what it makes once per machine and reuses: ``$XDG_CACHE_HOME/fedmml``, by default
``~/.cache/fedmml``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``parts`` under fedmml's cache folder (not created here)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "fedmml", *parts)
