"""Where a process computes: the torch device a config names and its intra-op thread count."""

from __future__ import annotations

import torch

from fedmml.config import Config, ConfigError


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without it is a one-line error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError('run.device = "cuda", but PyTorch sees no CUDA device here; use "auto" or "cpu"')
    return torch.device(name)


def apply_threads(cfg: Config) -> None:
    """Torch intra-op threads as configured (0 keeps PyTorch's default)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
