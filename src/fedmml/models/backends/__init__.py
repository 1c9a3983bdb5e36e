"""Encoder backends and the factory that builds a staged encoder from an encoder config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedmml.models.backends.aisfx_cnn import AisfxEncoder
from fedmml.models.backends.efficientnet_lite import EfficientNetLiteEncoder
from fedmml.models.backends.hf_ast import HFASTEncoder
from fedmml.models.backends.hf_bert import HFBertEncoder
from fedmml.models.backends.hf_vit import HFViTEncoder
from fedmml.models.staged import StagedEncoder

if TYPE_CHECKING:
    from fedmml.config import EncoderConfig

BACKENDS: dict[str, Callable[[EncoderConfig, bool], StagedEncoder]] = {
    "hf_vit": HFViTEncoder,
    "hf_bert": HFBertEncoder,
    "efficientnet_lite": EfficientNetLiteEncoder,
    "hf_ast": HFASTEncoder,
    "aisfx": AisfxEncoder,
}


def build_encoder(cfg: EncoderConfig, load_weights: bool = True) -> StagedEncoder:
    """The encoder of ``cfg`` at depth 0; ``load_weights=False``: same architecture, random weights."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown encoder backend {cfg.backend!r}; valid: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[cfg.backend](cfg, load_weights)
