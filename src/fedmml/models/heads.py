"""Projection and prediction heads (MLPs on top of an encoder's feature)."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """SimCLR-style projection MLP (the paper's): [Linear, Dropout, BN, ReLU] x (n-1), Linear, plain BN."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 3,
        dropout: float = 0.1,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        # A bias right before a BatchNorm is cancelled by its mean subtraction, so it is left out.
        bias = not batchnorm
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=bias), nn.Dropout(dropout)]
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project a batch of features, [batch, in_dim] -> [batch, out_dim]."""
        return self.net(x)


class PredictionHead(nn.Module):
    """Classification MLP: [Linear, Dropout, ReLU] x (n-1), then Linear to the class logits."""

    def __init__(
        self, in_dim: int, hidden_dim: int, num_classes: int, num_layers: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.Dropout(dropout), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, [batch, in_dim] -> [batch, num_classes]."""
        return self.net(x)
