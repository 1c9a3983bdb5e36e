"""StagedEncoder: an encoder whose blocks are appended one stage at a time.

Every backend (ViT, BERT, EfficientNet-Lite, ...) subclasses :class:`StagedEncoder` and supplies three hooks:
``embed`` (the stem's forward), ``run_block`` (one block's forward) and ``pool`` (hidden state -> one vector
per sample). The base class owns growth, the final norm and the neck, so that the federation code can treat
all encoders alike: ``stem``, ``blocks.<i>``, ``norm`` and ``neck`` are the only top-level children, and their
state-dict prefixes are what the methods freeze, train and send.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class StagedEncoder(nn.Module):
    """Stem, an ordered list of appendable blocks, a final norm and a neck giving a fixed-width feature."""

    def __init__(
        self,
        stem: nn.Module,
        block_pool: Sequence[nn.Module],
        widths: Sequence[int],
        make_norm: Callable[[int], nn.Module],
        neck_dim: int | None = None,
        stem_width: int | None = None,
    ) -> None:
        """``block_pool[j]`` is appended as block j; ``widths[j]`` is the feature width after block j.

        ``make_norm(width)`` builds the final norm for a given width (it is rebuilt when growth changes the
        width). ``neck_dim`` adds a trainable Linear from the current width to a fixed width; it is required
        when widths vary (CNNs), so the projection head always sees the same input size.
        """
        super().__init__()
        if len(block_pool) != len(widths):
            raise ValueError("block_pool and widths must have the same length")
        if neck_dim is None and len(set(widths)) > 1:
            raise ValueError("an encoder whose width changes with depth needs a neck_dim")
        self.stem = stem
        self.blocks = nn.ModuleList()
        # Plain list, not a ModuleList: blocks not yet appended are not part of the model or its state dict.
        self._pool = list(block_pool)
        self._widths = list(widths)
        self._stem_width = stem_width if stem_width is not None else self._widths[0]
        self._make_norm = make_norm
        self.neck_dim = neck_dim
        self.norm = make_norm(self.width)
        self.neck = self._build_neck(self.width)

    @property
    def total_blocks(self) -> int:
        """Depth of the encoder when fully grown."""
        return len(self._pool)

    @property
    def block_pool(self) -> list[nn.Module]:
        """Every block of the fully grown encoder, appended or not (block j is ``block_pool[j]``)."""
        return list(self._pool)

    @property
    def depth(self) -> int:
        """Number of blocks appended so far."""
        return len(self.blocks)

    @property
    def width(self) -> int:
        """Width of the pooled feature at the current depth (before the neck)."""
        return self.width_at(self.depth)

    def width_at(self, depth: int) -> int:
        """Width of the pooled feature with ``depth`` blocks."""
        return self._widths[depth - 1] if depth else self._stem_width

    def fresh_norm_and_neck(self, depth: int) -> tuple[nn.Module, nn.Module]:
        """A newly initialised final norm and neck for the width at ``depth`` (not attached)."""
        width = self.width_at(depth)
        return self._make_norm(width), self._build_neck(width)

    @property
    def out_dim(self) -> int:
        """Width of the encoder's output feature; constant across stages."""
        return self.neck_dim if self.neck_dim is not None else self._widths[-1]

    def _build_neck(self, width: int) -> nn.Module:
        return nn.Identity() if self.neck_dim is None else nn.Linear(width, self.neck_dim)

    def grow(self, n: int) -> range:
        """Append the next ``n`` blocks of the pool; return their indices."""
        if n < 0 or self.depth + n > self.total_blocks:
            raise ValueError(
                f"cannot grow by {n} blocks: depth {self.depth}, encoder has {self.total_blocks} blocks"
            )
        old_width = self.width
        start = self.depth
        # Pooled blocks were never reached by .to()/.train() on this module, so match them up on arrival.
        ref = next(self.stem.parameters())
        for j in range(start, start + n):
            self.blocks.append(self._pool[j].to(ref.device, ref.dtype).train(self.training))
        if self.width != old_width:
            # The pretrained norm and neck fit one width only; a new width needs fresh ones.
            norm, neck = self.fresh_norm_and_neck(self.depth)
            self.norm = norm.to(ref.device, ref.dtype).train(self.training)
            self.neck = neck.to(ref.device, ref.dtype).train(self.training)
        return range(start, start + n)

    def grow_to(self, depth: int) -> range:
        """Grow to exactly ``depth`` blocks (never shrinks)."""
        if depth < self.depth:
            raise ValueError(f"cannot shrink an encoder from {self.depth} to {depth} blocks")
        return self.grow(depth - self.depth)

    # Backend hooks -----------------------------------------------------------------------------------
    def prepare(self, raw: Any) -> dict[str, torch.Tensor]:
        """The backend's input dict for one batch of raw inputs (pixels, strings, filterbanks), on CPU."""
        raise NotImplementedError

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Run the stem; return the hidden state and any context the blocks need (e.g. attention mask)."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """Run one block."""
        raise NotImplementedError

    def pool(self, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        """Reduce the hidden state to one vector per sample, shape [batch, width]."""
        raise NotImplementedError

    def unbatch(self, hidden: torch.Tensor, context: Any) -> list[torch.Tensor]:
        """Per-sample hidden states for a frozen-prefix cache (context-free encoders: one row each)."""
        if context is not None:
            raise NotImplementedError(f"{type(self).__name__} must say how to split its context per sample")
        return list(hidden.unbind(0))

    def rebatch(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Inverse of :meth:`unbatch`: a batch of cached hidden states and the context the blocks need."""
        return torch.stack(rows), None

    # Forward -----------------------------------------------------------------------------------------
    def forward_prefix(self, inputs: dict[str, torch.Tensor], upto: int) -> tuple[torch.Tensor, Any]:
        """Hidden state after the stem and the first ``upto`` blocks."""
        hidden, context = self.embed(inputs)
        for block in list(self.blocks)[:upto]:
            hidden = self.run_block(block, hidden, context)
        return hidden, context

    def forward_suffix(self, hidden: torch.Tensor, context: Any, start: int) -> torch.Tensor:
        """Run blocks ``start..depth-1``, then pool, norm and neck."""
        for block in list(self.blocks)[start:]:
            hidden = self.run_block(block, hidden, context)
        return self.neck(self.norm(self.pool(hidden, context)))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled, normalised feature of shape [batch, out_dim]."""
        hidden, context = self.forward_prefix(inputs, self.depth)
        return self.forward_suffix(hidden, context, self.depth)
