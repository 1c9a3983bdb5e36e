"""Messages between server and clients: tensors as safetensors bytes plus a small JSON header.

Every byte count in fedmml comes from here, from the serialised form, so what is reported is what a real
transport would carry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class PayloadError(ValueError):
    """A payload that does not match what the receiver expects."""


@dataclass
class Message:
    """One message: JSON-able metadata and serialised tensors. ``nbytes`` is what goes over the wire."""

    meta: dict[str, Any]
    blob: bytes = b""
    header: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.header = json.dumps(self.meta, sort_keys=True).encode()

    @property
    def nbytes(self) -> int:
        """Serialised size: tensor blob plus JSON header."""
        return len(self.blob) + len(self.header)


def serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors to safetensors bytes (CPU, contiguous)."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def deserialize(blob: bytes) -> dict[str, torch.Tensor]:
    """Safetensors bytes back to tensors."""
    return st_load(blob) if blob else {}


def validate(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Exactly the expected keys, with matching shapes and dtypes."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise PayloadError(f"payload keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, ref in expected.items():
        got = tensors[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise PayloadError(
                f"{key}: got {tuple(got.shape)} {got.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
            )
