"""LoRA adapters (HF ``peft``) on every block of every encoder, for the ``lora`` reference method.

An adapter goes on every ``Linear`` of a block (the attention and MLP projections of ViT, BERT, MiniLM and
AST) and on every ``Conv2d`` with ``groups == 1``: in EfficientNet-Lite's MBConv blocks those are the 1x1
expansion and projection convolutions, which hold nearly all of a block's weights. Depthwise convolutions
(one 3x3 or 5x5 filter per channel) stay frozen: a low-rank update of a per-channel filter saves nothing.
The base weights stay as they were loaded; the adapters' B matrices start at zero, so a model with fresh
adapters computes exactly what the pretrained one does.
"""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from fedmml.config import ModelConfig
from fedmml.models.multimodal import MultimodalModel


def adapted_layers(block: nn.Module) -> list[str]:
    """Names of the layers of ``block`` that get an adapter."""
    return [
        name
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
    ]


def _plain_pointwise(block: nn.Module, names: list[str]) -> None:
    """Make each adapted convolution a plain ``nn.Conv2d`` holding the same parameters.

    peft builds a convolution's adapter with the layer's own class, and EfficientNet-Lite's
    ``Conv2dStaticSamePadding`` cannot be built without an image size. Its 1x1, stride-1 convolutions pad
    nothing, so a plain convolution computes exactly what they do.
    """
    for name in names:
        conv = block.get_submodule(name)
        if not isinstance(conv, nn.Conv2d) or type(conv) is nn.Conv2d:
            continue
        if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1):
            raise ValueError(
                f"cannot adapt {type(conv).__name__} {name}: only its 1x1, stride-1 form pads nothing"
            )
        plain = nn.Conv2d(
            conv.in_channels, conv.out_channels, 1, groups=conv.groups, bias=conv.bias is not None
        )
        plain.weight, plain.bias = conv.weight, conv.bias
        block.set_submodule(name, plain)


def add_adapters(model: MultimodalModel, cfg: ModelConfig) -> None:
    """Inject an adapter of rank ``model.lora_rank`` into every block of every encoder, grown or not."""
    for encoder in model.encoders.values():
        for block in encoder.block_pool:
            _plain_pointwise(block, adapted_layers(block))
            settings = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=adapted_layers(block),
            )
            inject_adapter_in_model(settings, block)
