"""FLOP counts of real forward + backward passes against hand-computed counts (2 FLOPs per multiply-add)."""

import torch
import torch.nn.functional as F
from torch import nn

from fedmml.accounting import count_flops


def test_linear_stack_forward_and_backward_match_the_analytic_count() -> None:
    n, a, b, c = 8, 16, 32, 4
    model = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    x = torch.randn(n, a)  # needs no gradient, so the first layer computes no input gradient

    _, forward = count_flops(lambda: model(x))
    _, step = count_flops(lambda: model(x).sum().backward())

    assert forward == 2 * n * (a * b + b * c)
    # backward: both weight gradients, plus the input gradient of the second layer only
    assert step == forward + 2 * n * (a * b + b * c) + 2 * n * b * c


def test_frozen_first_layer_skips_its_backward() -> None:
    n, a, b, c = 8, 16, 32, 4
    model = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
    model[0].requires_grad_(False)
    _, step = count_flops(lambda: model(torch.randn(n, a)).sum().backward())
    assert step == 2 * n * (a * b + b * c) + 2 * n * b * c  # forward + last layer's weight gradient


def test_attention_matmuls_match_the_analytic_count() -> None:
    bsz, heads, seq, dim = 2, 3, 10, 8
    q, k, v = (torch.randn(bsz, heads, seq, dim, requires_grad=True) for _ in range(3))
    per_matmul = 2 * bsz * heads * seq * seq * dim

    _, explicit = count_flops(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    assert explicit == 2 * per_matmul

    # The fused CPU kernel (PyTorch's own registry misses it) counts the same two matmuls ...
    _, fused = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert fused == 2 * per_matmul
    # ... and its backward recomputes the scores and takes four gradient matmuls.
    _, step = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert step == 2 * per_matmul + 5 * per_matmul


def test_depthwise_convolution_backward_is_twice_the_forward() -> None:
    n, ch, size = 2, 6, 8
    conv = nn.Conv2d(ch, ch, 3, padding=1, groups=ch, bias=False)
    x = torch.randn(n, ch, size, size, requires_grad=True)
    _, forward = count_flops(lambda: conv(x))
    _, step = count_flops(lambda: conv(x).sum().backward())
    assert forward == 2 * n * ch * size * size * 9
    assert step == 3 * forward  # forward + input gradient + weight gradient
