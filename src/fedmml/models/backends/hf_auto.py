"""Any Hugging Face encoder whose blocks can be found, as a staged encoder (``backend = "hf_auto"``).

The model comes from ``pretrained`` (a local folder or hub id) or, with ``pretrained = ""``, from ``arch``
with its ``model_type`` (random init, e.g. ``{model_type = "roberta", hidden_size = 256, ...}``). Its parts
are found by attribute path, under the model itself or its ``vision_model`` / ``text_model`` / ``model``:

- blocks: ``model.<enc>.blocks`` when set, else the first of ``encoder.layer``, ``encoder.layers``,
  ``layers``, ``layer``, ``transformer.layer``, ``blocks`` that is a non-empty list of modules;
- stem: ``model.<enc>.stem`` when set, else ``embeddings`` beside the blocks (with a pre-norm such as CLIP's
  ``pre_layrnorm`` after it);
- final norm: ``post_layernorm``, ``layernorm``, ``final_layer_norm`` or ``norm`` beside them, else none.

What the model reads decides the modality: ``pixel_values`` (an image tower: ViT, DeiT, CLIP's vision
model, ...: the first token pooled, as they do) or ``input_ids`` (a bidirectional text tower: BERT, RoBERTa,
...: tokenised, masked, pooled and cached exactly as :class:`~fedmml.models.backends.hf_bert.HFBertEncoder`
does). A model none of these fit is refused in one line naming what was not found.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from fedmml.config import ConfigError
from fedmml.models.backends.hf_bert import HFBertEncoder, package_dir
from fedmml.models.staged import StagedEncoder

if TYPE_CHECKING:
    from fedmml.config import EncoderConfig

ROOTS = ("", "vision_model.", "text_model.", "model.")
BLOCK_PATHS = ("encoder.layer", "encoder.layers", "layers", "layer", "transformer.layer", "blocks")
PRE_NORMS = ("pre_layrnorm", "pre_layernorm")
FINAL_NORMS = ("post_layernorm", "layernorm", "final_layer_norm", "norm")
CAUSAL_TEXT = ("clip_text_model", "gpt2", "llama", "mistral", "qwen2")


class UnsupportedModel(ConfigError):
    """A model hf_auto cannot stage; the message names what was not found."""


def load_auto(cfg: EncoderConfig, load_weights: bool) -> PreTrainedModel:
    """The model of ``cfg``: random init from ``arch`` (its ``model_type`` required), or pretrained."""
    arch = dict(cfg.arch)
    model_type = arch.pop("model_type", None)
    if not cfg.pretrained:
        if not model_type:
            raise UnsupportedModel(
                'hf_auto with pretrained = "" needs arch.model_type (e.g. "vit", "roberta")'
            )
        config = AutoConfig.for_model(model_type, **arch)
        if hasattr(config, "image_size") and "image_size" not in arch:
            config.image_size = cfg.image_size  # position embeddings for the images it will see
        return AutoModel.from_config(config)
    source = package_dir() if cfg.pretrained == "package" else cfg.pretrained
    if load_weights:
        return AutoModel.from_pretrained(source, **arch)
    return AutoModel.from_config(AutoConfig.from_pretrained(source, **arch))


def _get(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class Stem(nn.Module):
    """The embeddings, then the pre-norm some towers apply before their first block (CLIP)."""

    def __init__(self, embeddings: nn.Module, pre_norm: nn.Module | None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.pre_norm = pre_norm if pre_norm is not None else nn.Identity()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.pre_norm(self.embeddings(*args, **kwargs))


def find_parts(model: nn.Module, cfg: EncoderConfig) -> tuple[nn.Module, list[nn.Module], nn.Module | None]:
    """(stem, blocks, final norm or None) of ``model``, as the module docstring says."""
    kind = type(model).__name__
    if cfg.blocks:
        candidates = [cfg.blocks]
    else:
        candidates = [root + path for root in ROOTS for path in BLOCK_PATHS]
    found = next(
        (p for p in candidates if isinstance(_get(model, p), nn.ModuleList) and len(_get(model, p))), None
    )
    if found is None:
        raise UnsupportedModel(
            f"hf_auto found no blocks in {kind}: none of {', '.join(candidates)} is a list of modules; "
            "name them with model.<modality>.blocks"
        )
    root = next((r for r in ROOTS if r and found.startswith(r)), "")
    stem_path = cfg.stem or root + "embeddings"
    embeddings = _get(model, stem_path)
    if not isinstance(embeddings, nn.Module):
        raise UnsupportedModel(
            f"hf_auto found the blocks of {kind} at {found} but no stem at {stem_path}; name it with "
            "model.<modality>.stem"
        )
    pre = next((m for p in PRE_NORMS if isinstance(m := _get(model, root + p), nn.Module)), None)
    norm = next((m for p in FINAL_NORMS if isinstance(m := _get(model, root + p), nn.LayerNorm)), None)
    return Stem(embeddings, pre), list(_get(model, found)), norm


def _extra_arguments(block: nn.Module) -> int:
    """How many positional arguments after the hidden state a block's forward requires (passed as None:
    masks images do not need, e.g. CLIP's causal mask slot)."""
    params = list(inspect.signature(block.forward).parameters.values())[1:]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in positional and p.default is inspect.Parameter.empty)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _fixed_norm(norm: nn.Module, width: int) -> nn.Module:
    return norm


def _no_norm(width: int) -> nn.Module:
    return nn.Identity()


def build_hf_auto(cfg: EncoderConfig, load_weights: bool = True) -> StagedEncoder:
    """The staged encoder of any supported Hugging Face model (see the module docstring)."""
    # from_pretrained returns eval mode; start every block in the mode of a new module.
    model = load_auto(cfg, load_weights).train()
    model_type = getattr(model.config, "model_type", "")
    if model.main_input_name == "pixel_values":
        return HFAutoImage(model, cfg)
    if model.main_input_name == "input_ids":
        if model_type in CAUSAL_TEXT:
            raise UnsupportedModel(f"hf_auto stages bidirectional text towers; {model_type} attends causally")
        return HFAutoText(model, cfg)
    raise UnsupportedModel(
        f"hf_auto stages image towers (pixel_values) and text towers (input_ids); {type(model).__name__} "
        f"reads {model.main_input_name}"
    )


class HFAutoImage(StagedEncoder):
    """An image tower: stem = embeddings (+ pre-norm), blocks, first-token pooling, its final norm."""

    def __init__(self, model: PreTrainedModel, cfg: EncoderConfig) -> None:
        stem, blocks, norm = find_parts(model, cfg)
        hidden = model.config.hidden_size
        super().__init__(
            stem=stem,
            block_pool=blocks,
            widths=[hidden] * len(blocks),
            make_norm=partial(_fixed_norm, norm) if norm is not None else _no_norm,
            neck_dim=cfg.neck_dim or None,
            stem_width=hidden,
        )
        self.extra = _extra_arguments(blocks[0])
        accepts = inspect.signature(stem.embeddings.forward).parameters
        self.interpolates = "interpolate_pos_encoding" in accepts
        self.image_size = getattr(model.config, "image_size", cfg.image_size)

    def prepare(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch of normalised pixels, [batch, 3, H, W]."""
        return {"pixel_values": raw}

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        pixels = inputs["pixel_values"].to(next(self.stem.parameters()).dtype)
        size = self.image_size if isinstance(self.image_size, tuple | list) else (self.image_size,) * 2
        if self.interpolates and tuple(pixels.shape[-2:]) != tuple(size):
            return self.stem(pixels, interpolate_pos_encoding=True), None
        return self.stem(pixels), None

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        return _first(block(hidden, *([None] * self.extra)))

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """The first token (CLS), as ViT and CLIP pool; a per-token norm may follow the pooling."""
        return hidden[:, 0]


class HFAutoText(HFBertEncoder):
    """A bidirectional text tower: its embeddings and blocks, BERT's tokenising, masking, pooling and
    caching (see :class:`HFBertEncoder`)."""

    def __init__(self, model: PreTrainedModel, cfg: EncoderConfig) -> None:
        stem, blocks, norm = find_parts(model, cfg)
        hidden = model.config.hidden_size
        StagedEncoder.__init__(
            self,
            stem=stem.embeddings,  # text towers have no pre-norm: the embeddings keep their own state keys
            block_pool=blocks,
            widths=[hidden] * len(blocks),
            make_norm=partial(_fixed_norm, norm) if norm is not None else _no_norm,
            neck_dim=cfg.neck_dim or None,
            stem_width=hidden,
        )
        self.setup_text(cfg, model.config)
        self.extra = _extra_arguments(blocks[0]) - 1  # the mask is the first

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        return _first(block(hidden, context[0], *([None] * max(self.extra, 0))))
