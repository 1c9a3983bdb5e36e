"""The aisfx sound-effects CNN (PyPI ``aisfx``, ISMIR 2022 "X-Sequential-CE") as a staged audio encoder.

The network is four ConvBlocks of two 3x3 conv + BatchNorm + ReLU layers each (64, 128, 256, 512 channels),
with a 2x2 max pool after blocks 1-3, then a mean over frequency and a max over time (a 512-d embedding).
Staging: the stem is ConvBlock 1 and every later conv layer is one block, so the encoder has 6 blocks (widths
128, 128, 256, 256, 512, 512), the audio depth of the paper's 6-stage schedules. Its input is the package's
feature: 96-bin log-mel at 44.1 kHz (2048-sample window, 1024 hop), ``log10(1 + 10^4 mel)`` divided by
9.457798957824707 (its "original" min-max normalisation), laid out [batch, frames, 96]. It was trained on
100-frame (2.3 s) blocks, but the pooling accepts any number of frames >= 8.

aisfx pins numpy 1.23 and librosa 0.9, so it is installed with ``pip install --no-deps aisfx``; only its
model code and checkpoint are used here, imported when an encoder is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmml.models.staged import StagedEncoder

if TYPE_CHECKING:
    from fedmml.config import EncoderConfig

MEL_BINS = 96


def load_embedding_net(cfg: EncoderConfig, load_weights: bool) -> nn.Module:
    """aisfx's EmbeddingNet: random init, or the packaged X-Sequential-CE weights (pretrained "package")."""
    from aisfx.inference import get_path_modelWeights
    from aisfx.models.cnn2d import EmbeddingNet

    # The package's best model: max pooling, 3x3 kernels, stride 1, 64 channels in the first block.
    net = EmbeddingNet("max", 3, 1, 64)
    if cfg.pretrained not in ("", "package"):
        raise ValueError("aisfx supports pretrained='' (random init) or 'package' (the packaged weights)")
    if cfg.pretrained and load_weights:
        # The checkpoint is a pickled (state_dict, dataset map) tuple with numpy scalars, so it needs
        # weights_only=False; it is the package's own file, never a user-supplied path.
        state, _ = torch.load(get_path_modelWeights(), map_location="cpu", weights_only=False)
        prefix = "embedding_net."
        net.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return net


class ConvLayer(nn.Module):
    """One conv layer of an aisfx ConvBlock: conv, batch norm, ReLU, and the block's 2x2 max pool if last."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: bool) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, C_in, T, F] -> [batch, C_out, T', F'] (halved by the pool)."""
        x = F.relu(self.bn(self.conv(x)))
        return F.max_pool2d(x, kernel_size=2) if self.pool else x


def conv_layers(block: nn.Module, pool: bool) -> list[ConvLayer]:
    """The two conv layers of a ConvBlock (the package's module); the pool follows the second."""
    return [ConvLayer(block.conv1, block.bn1, False), ConvLayer(block.conv2, block.bn2, pool)]


class AisfxEncoder(StagedEncoder):
    """aisfx CNN: stem = ConvBlock 1, blocks = conv layers, mean-freq/max-time pool, fresh LayerNorm."""

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True) -> None:
        if cfg.neck_dim <= 0:
            raise ValueError("aisfx needs neck_dim > 0: its feature width changes with depth")
        # Blocks appended later keep the mode they have: start them all in the mode of a new module.
        net = load_embedding_net(cfg, load_weights).train()
        blocks = [
            *conv_layers(net.conv_block2, pool=True),
            *conv_layers(net.conv_block3, pool=True),
            # The package "pools" block 4 with a 1x1 window, i.e. not at all.
            *conv_layers(net.conv_block4, pool=False),
        ]
        super().__init__(
            stem=nn.Sequential(*conv_layers(net.conv_block1, pool=True)),
            block_pool=blocks,
            widths=[b.conv.out_channels for b in blocks],
            make_norm=nn.LayerNorm,
            neck_dim=cfg.neck_dim,
            stem_width=net.conv_block1.conv2.out_channels,
        )

    def prepare(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch of normalised 96-bin log-mel spectrograms, [batch, frames, 96]."""
        return {"input_values": raw}

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Feature map after ConvBlock 1; CNN blocks need no context."""
        values = inputs["input_values"]
        if values.shape[-1] != MEL_BINS:
            raise ValueError(f"aisfx expects [batch, frames, {MEL_BINS}] log-mel, got {list(values.shape)}")
        return self.stem(values.unsqueeze(1).to(self.stem[0].conv.weight.dtype)), None

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """One conv layer."""
        return block(hidden)

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """The package's pooling: mean over frequency, then max over time."""
        return hidden.mean(dim=3).amax(dim=2)
