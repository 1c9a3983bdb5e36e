"""Messages between server and clients: tensors as safetensors bytes plus a small JSON header.

Every byte count in fedmml comes from here, from the serialised form, so what is reported is what a real
transport would carry. Floating tensors can travel lighter than the float32 master weights
(``transport.dtype``): :func:`encode` before serialising, :func:`decode` after deserialising.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedmml.config import TRANSPORT_DTYPES
from fedmml.methods import ENCODER_PREFIX

Tensors = dict[str, torch.Tensor]

# int8 tensors travel with their float32 scale under this suffix; no model key ends like this.
SCALE_SUFFIX = ".__scale__"
_INT8_MAX = 127


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


def _quantise(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and one float32 scale per row (output channel) of a matrix or kernel, so that
    one row's outliers coarsen only that row. A non-finite row gets a NaN scale, so that the receiver's
    non-finite check still rejects the tensor."""
    value = value.detach().to(torch.float32)
    rows = value.reshape(value.shape[0], -1)
    if rows.numel() == 0:
        return torch.zeros_like(value, dtype=torch.int8), torch.zeros(rows.shape[0])
    amax = rows.abs().amax(dim=1)
    finite = torch.isfinite(amax)
    scale = torch.where(finite, amax / _INT8_MAX, torch.full_like(amax, float("nan")))
    # An all-zero row has scale 0: divide by 1 instead, its codes are 0 either way.
    divisor = torch.where(finite & (scale > 0), scale, torch.ones_like(scale)).unsqueeze(1)
    codes = torch.round(rows / divisor).clamp_(-_INT8_MAX, _INT8_MAX)
    codes = torch.where(finite.unsqueeze(1), codes, torch.zeros_like(codes)).to(torch.int8)
    return codes.reshape(value.shape), scale


def _dequantise(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """Inverse of :func:`_quantise`; None when ``scale`` does not fit (left for validate to reject)."""
    if codes.dim() < 2 or scale.shape != codes.shape[:1]:
        return None
    return codes.to(torch.float32) * scale.to(torch.float32).reshape(-1, *[1] * (codes.dim() - 1))


def encode(tensors: Mapping[str, torch.Tensor], dtype: str = "float32") -> dict[str, torch.Tensor]:
    """Tensors as they travel in ``dtype``; integer tensors (e.g. ``num_batches_tracked``) are unchanged."""
    if dtype not in TRANSPORT_DTYPES:
        raise PayloadError(f"unknown transport dtype {dtype!r}; valid: {', '.join(TRANSPORT_DTYPES)}")
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not value.is_floating_point() or dtype == "float32":
            out[key] = value
        elif dtype == "float16" or value.dim() < 2:
            # Under int8, vectors and scalars (biases, norm weights, BatchNorm statistics) travel as float16:
            # they are a sliver of the bytes, and a shared int8 scale would round a BatchNorm's small running
            # variances to zero next to its large ones.
            out[key] = value.detach().to(torch.float16)
        else:
            out[key], out[key + SCALE_SUFFIX] = _quantise(value)
    return out


def decode(
    tensors: Mapping[str, torch.Tensor], reference_dtypes: Mapping[str, torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode`: floating tensors back to their reference dtype (default float32)."""
    # Only floats and int8 codes with their scale are converted; anything else (an orphan scale, int8 codes
    # without one, a float where an integer buffer belongs) is left as received for validate() to reject.
    ref = reference_dtypes or {}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        base = key.removesuffix(SCALE_SUFFIX)
        if base != key and base in tensors and tensors[base].dtype == torch.int8:
            continue  # consumed with its codes below
        target = ref.get(key, torch.float32)
        scale = tensors.get(key + SCALE_SUFFIX)
        restored = (
            _dequantise(value, scale)
            if scale is not None and value.dtype == torch.int8 and target.is_floating_point
            else None
        )
        if restored is not None:
            out[key] = restored.to(target)
        elif value.is_floating_point() and target.is_floating_point:
            out[key] = value.to(target)
        else:
            out[key] = value
    return out


def lossy(dtype: str) -> bool:
    """Whether ``dtype`` rounds floating tensors on the wire."""
    return dtype != "float32"


def to_delta(update: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> Tensors:
    """A client's update as the change from the weights it started the round with (floating tensors)."""
    return {k: v - start[k] if v.is_floating_point() else v for k, v in update.items()}


def from_delta(delta: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> Tensors:
    """Inverse of :func:`to_delta` on the server's ``base`` weights.

    Only a floating tensor whose key and shape match is added; anything else is left as received, so that
    :func:`validate` rejects it instead of broadcasting a wrong shape into a right one.
    """
    out = {}
    for key, value in delta.items():
        ref = base.get(key)
        matches = ref is not None and value.is_floating_point() and value.shape == ref.shape
        out[key] = ref + value.to(ref.dtype) if matches else value
    return out


def pack(tensors: Mapping[str, torch.Tensor], dtype: str = "float32") -> bytes:
    """Encode for ``dtype`` and serialise: the blob of a message."""
    return serialize(encode(tensors, dtype))


def unpack(blob: bytes, reference_dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Deserialise and decode a blob made by :func:`pack`."""
    return decode(deserialize(blob), reference_dtypes)


UPLOAD_PARTS = ("encoder_blocks", "stems", "norms_necks", "heads")


def upload_parts(
    state: Mapping[str, torch.Tensor], keys: list[str], dtype: str = "float32"
) -> dict[str, int]:
    """Wire bytes of ``keys`` in ``dtype``, split into encoder blocks, stems, final norms + necks, heads."""
    parts = dict.fromkeys(UPLOAD_PARTS, 0)
    for key in keys:
        # Through the transport's own encoder, so an int8 scale is counted with its tensor.
        wire = encode({key: state[key]}, dtype).values()
        nbytes = sum(t.numel() * t.element_size() for t in wire)
        if key.startswith(ENCODER_PREFIX):
            child = key.split(".")[2]  # stem | blocks | norm | neck
            parts[{"blocks": "encoder_blocks", "stem": "stems"}.get(child, "norms_necks")] += nbytes
        else:
            parts["heads"] += nbytes
    return parts
