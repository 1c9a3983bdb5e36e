"""Projection and prediction heads: shapes, structure, parameter counts."""

from __future__ import annotations

import torch
from torch import nn

from fedmml.models.heads import PredictionHead, ProjectionHead


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def linears(m: nn.Module) -> list[nn.Linear]:
    return [x for x in m.modules() if isinstance(x, nn.Linear)]


def test_projection_head_shape():
    head = ProjectionHead(192, 64, 16)
    assert head(torch.randn(5, 192)).shape == (5, 16)
    head.eval()
    assert head(torch.randn(1, 192)).shape == (1, 16)


def test_paper_head_parameter_count():
    # Three bias-free Linears plus the affine pairs of the two hidden BatchNorms; the output BN has none.
    head = ProjectionHead(192, 4096, 256)
    expected = 192 * 4096 + 4096 * 4096 + 4096 * 256 + 2 * 2 * 4096
    assert expected == 18_628_608  # "18.63 M"
    assert n_params(head) == expected


def test_projection_head_structure_with_batchnorm():
    head = ProjectionHead(8, 32, 4, num_layers=3, dropout=0.2)
    kinds = [type(m) for m in head.net]
    hidden = [nn.Linear, nn.Dropout, nn.BatchNorm1d, nn.ReLU]
    assert kinds == hidden * 2 + [nn.Linear, nn.BatchNorm1d]
    assert all(lin.bias is None for lin in linears(head))
    assert not head.net[-1].affine and head.net[2].affine
    assert head.net[1].p == 0.2


def test_projection_head_without_batchnorm():
    head = ProjectionHead(8, 32, 4, batchnorm=False)
    assert [type(m) for m in head.net] == [nn.Linear, nn.Dropout, nn.ReLU] * 2 + [nn.Linear]
    assert all(lin.bias is not None for lin in linears(head))


def test_single_layer_projection_head():
    head = ProjectionHead(8, 32, 4, num_layers=1)
    assert [type(m) for m in head.net] == [nn.Linear, nn.BatchNorm1d]
    assert head.net[0].in_features == 8 and head.net[0].out_features == 4 and head.net[0].bias is None
    plain = ProjectionHead(8, 32, 4, num_layers=1, batchnorm=False)
    assert [type(m) for m in plain.net] == [nn.Linear] and plain.net[0].bias is not None


def test_prediction_head():
    head = PredictionHead(16, 32, 10)
    assert [type(m) for m in head.net] == [nn.Linear, nn.Dropout, nn.ReLU, nn.Linear]
    assert all(lin.bias is not None for lin in linears(head))
    assert head(torch.randn(3, 16)).shape == (3, 10)
    assert n_params(head) == 16 * 32 + 32 + 32 * 10 + 10
    assert [type(m) for m in PredictionHead(16, 32, 10, num_layers=1).net] == [nn.Linear]
    assert len(linears(PredictionHead(16, 32, 10, num_layers=3))) == 3
