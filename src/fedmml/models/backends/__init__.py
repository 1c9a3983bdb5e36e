"""Encoder backends, the factory that builds a staged encoder from an encoder config, and the registry that
lets a user add their own.

A backend is a builder ``(encoder_config, load_weights) -> StagedEncoder``: it returns the encoder at depth 0
with every block in its pool (the contract is :class:`fedmml.models.staged.StagedEncoder`'s: a stem, blocks
appended one stage at a time, a final norm, a pooled output, and the ``prepare`` / ``embed`` / ``run_block``
/ ``pool`` hooks; ``unbatch`` / ``rebatch`` when its blocks need a per-sample context such as a padding mask,
for LW's frozen-prefix cache). ``load_weights=False`` builds the same architecture with random weights (a
client that receives its weights from the server).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedmml.config import ConfigError
from fedmml.models.backends.aisfx_cnn import AisfxEncoder
from fedmml.models.backends.efficientnet_lite import EfficientNetLiteEncoder
from fedmml.models.backends.hf_ast import HFASTEncoder
from fedmml.models.backends.hf_auto import build_hf_auto
from fedmml.models.backends.hf_bert import HFBertEncoder
from fedmml.models.backends.hf_vit import HFViTEncoder
from fedmml.models.staged import StagedEncoder

if TYPE_CHECKING:
    from fedmml.config import EncoderConfig

Builder = Callable[["EncoderConfig", bool], StagedEncoder]

BACKENDS: dict[str, Builder] = {
    "hf_vit": HFViTEncoder,
    "hf_bert": HFBertEncoder,
    "hf_auto": build_hf_auto,
    "efficientnet_lite": EfficientNetLiteEncoder,
    "hf_ast": HFASTEncoder,
    "aisfx": AisfxEncoder,
}


def register_backend(name: str, builder: Builder) -> None:
    """Make ``model.<modality>.backend = name`` build its encoder with ``builder`` (see the module
    docstring for the contract). A built-in name cannot be replaced; registering a name again replaces the
    earlier registration. Registration lasts for the process: a federation whose clients run in other
    processes (Flower, parallel clients) must register there too, e.g. on import of the user's module."""
    if not callable(builder):
        raise TypeError(f"the builder of backend {name!r} must be callable")
    if name in BUILT_IN:
        raise ConfigError(f"backend {name!r} is built in; register yours under another name")
    BACKENDS[name] = builder


BUILT_IN = frozenset(BACKENDS)


def build_encoder(cfg: EncoderConfig, load_weights: bool = True) -> StagedEncoder:
    """The encoder of ``cfg`` at depth 0; ``load_weights=False``: same architecture, random weights."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"unknown encoder backend {cfg.backend!r}; valid: {', '.join(sorted(BACKENDS))}")
    encoder = BACKENDS[cfg.backend](cfg, load_weights)
    if not isinstance(encoder, StagedEncoder):
        raise ConfigError(f"backend {cfg.backend!r} built a {type(encoder).__name__}, not a StagedEncoder")
    return encoder
