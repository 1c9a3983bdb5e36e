"""Hugging Face Audio Spectrogram Transformer as a staged encoder: embeddings as stem, a layer per block."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import ASTConfig, ASTModel

from fedmml.models.staged import StagedEncoder

if TYPE_CHECKING:
    from fedmml.config import EncoderConfig

# Summary tokens the pooling reads: "cls" is token 0 (the reference code's feature), "mean" averages the CLS
# and distillation tokens (ASTModel's pooler_output).
SUMMARY_TOKENS = {"cls": 1, "mean": 2}


def load_ast(cfg: EncoderConfig, load_weights: bool) -> ASTModel:
    """The AST of ``cfg``: random init from ``arch``, or a pretrained dir/hub id with ``arch`` overrides."""
    arch = dict(cfg.arch)
    if not cfg.pretrained:
        return ASTModel(ASTConfig(**arch))
    if cfg.pretrained == "package":
        raise ValueError("hf_ast has no packaged weights; use pretrained='' or a local dir / hub id")
    if load_weights:
        return ASTModel.from_pretrained(cfg.pretrained, **arch)
    return ASTModel(ASTConfig.from_pretrained(cfg.pretrained, **arch))


class SummaryTokenNorm(nn.LayerNorm):
    """The final LayerNorm applied to each summary token, then their mean.

    ASTModel normalises every token before its pooler averages CLS and distillation, and the mean of two
    normalised tokens is not the normalised mean, so this norm takes the summary tokens [batch, k, width]
    rather than one pooled vector. Its parameters are a plain LayerNorm's (``weight``, ``bias``).
    """

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, k, width] summary tokens -> [batch, width]."""
        return super().forward(tokens).mean(dim=1)


def _pretrained_norm(norm: nn.Module, width: int) -> nn.Module:
    return norm


class HFASTEncoder(StagedEncoder):
    """AST: stem = embeddings (patches, CLS, distillation, positions), blocks = layers, final layernorm."""

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True) -> None:
        if cfg.pooling not in SUMMARY_TOKENS:
            raise ValueError(f"unknown pooling {cfg.pooling!r}; valid choices: {', '.join(SUMMARY_TOKENS)}")
        # from_pretrained returns eval mode, a fresh model train mode; blocks appended later keep the mode
        # they have, so start them all in the mode of a new module.
        model = load_ast(cfg, load_weights).train()
        config = model.config
        hidden = config.hidden_size
        norm = SummaryTokenNorm(hidden, eps=config.layer_norm_eps)
        norm.load_state_dict(model.layernorm.state_dict())
        super().__init__(
            stem=model.embeddings,
            block_pool=list(model.layers),
            widths=[hidden] * len(model.layers),
            # Width never changes, so the base calls this once and keeps the pretrained final layernorm
            # (a partial, not a lambda, so the encoder stays picklable).
            make_norm=partial(_pretrained_norm, norm),
            neck_dim=cfg.neck_dim or None,
            stem_width=hidden,
        )
        self.summary_tokens = SUMMARY_TOKENS[cfg.pooling]
        # Position embeddings are learned for one spectrogram size; AST cannot interpolate them.
        self.input_shape = (config.max_length, config.num_mel_bins)

    @property
    def num_tokens(self) -> int:
        """Sequence length the blocks see: the patches plus the CLS and distillation tokens."""
        return self.stem.position_embeddings.shape[1]

    def prepare(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch of log-mel filterbanks, [batch, frames, mel bins]."""
        return {"input_values": raw}

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Patch embeddings with the CLS and distillation tokens; spectrograms need no attention mask."""
        values = inputs["input_values"]
        if tuple(values.shape[1:]) != self.input_shape:
            raise ValueError(
                f"AST expects filterbanks of shape [batch, {self.input_shape[0]}, {self.input_shape[1]}] "
                f"(arch max_length, num_mel_bins), got {list(values.shape)}"
            )
        return self.stem(values.to(self.stem.position_embeddings.dtype)), None

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """One AST layer."""
        return block(hidden, None)

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """The summary tokens, [batch, k, width]: the final norm normalises each and averages them."""
        return hidden[:, : self.summary_tokens]
