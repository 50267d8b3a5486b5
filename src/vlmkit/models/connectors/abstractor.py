"""Honeybee's C-Abstractor (also MM1's): convolutions keep locality while pooling to fewer tokens."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmkit.models.connectors.base import (
    CONNECTORS,
    Connector,
    LayerNorm2d,
    check_dims,
    check_options_positive,
    grid_to_tokens,
    mlp,
    square_side,
    tokens_to_grid,
)


class ResBlock(nn.Module):
    """Bottleneck residual block (RegNet-style, as Honeybee): 1x1, depthwise 3x3, 1x1; LayerNorm, SiLU.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``; the shortcut is a 1x1 conv when
    the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), LayerNorm2d(out_channels), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels, bias=False),
            LayerNorm2d(out_channels), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 1, bias=False), LayerNorm2d(out_channels),
        )
        self.shortcut = (
            nn.Identity() if in_channels == out_channels
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), LayerNorm2d(out_channels))
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shortcut(x) + self.body(x))


class CAbstractor(Connector):
    """Honeybee C-Abstractor: ResNet blocks, adaptive pooling to num_queries tokens, ResNet blocks, MLP.

    Args:
        in_dim: vision token width. out_dim: language hidden size.
        num_input_tokens: tokens per image; must be a square ``S * S``.
        num_queries: output tokens, a perfect square no larger than ``num_input_tokens``;
            default 64, or ``num_input_tokens`` when that is smaller.
        depth: residual blocks before and after the pooling (Honeybee: 3).
        hidden_size: width of the conv stages; default ``in_dim``.
        mlp_depth: linear layers of the readout MLP to ``out_dim`` (SiLU between them).
        pos_emb: add a learned position embedding to the input tokens (Honeybee does).

    Shapes: ``(B, S*S, in_dim) -> (B, num_queries, out_dim)``.

    Raises:
        ValueError: at build time when ``num_input_tokens`` is not a square, ``num_queries`` is not
            a perfect square or exceeds the input count, or a size option is below 1.
    """

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int, num_queries: int | None = None,
                 depth: int = 3, hidden_size: int | None = None, mlp_depth: int = 2, pos_emb: bool = True):
        super().__init__()
        check_dims("c_abstractor", in_dim, out_dim)
        self.side = square_side("c_abstractor", num_input_tokens)
        check_options_positive("c_abstractor", depth=depth, hidden_size=hidden_size, mlp_depth=mlp_depth)
        if num_queries is None:
            num_queries = min(64, num_input_tokens)
        out_side = math.isqrt(num_queries) if num_queries > 0 else 0
        if out_side == 0 or out_side * out_side != num_queries:
            raise ValueError(f"connector 'c_abstractor' option num_queries={num_queries} must be a perfect square "
                             f"(e.g. 64 or 144)")
        if num_queries > num_input_tokens:
            raise ValueError(f"connector 'c_abstractor' option num_queries={num_queries} exceeds the "
                             f"{num_input_tokens} tokens the vision encoder emits; it compresses, so use at most that")
        self.out_side = out_side
        self.num_output_tokens = num_queries
        width = hidden_size or in_dim
        self.pos_emb = nn.Parameter(torch.randn(1, num_input_tokens, in_dim) * 0.02) if pos_emb else None
        self.before = nn.Sequential(*(ResBlock(in_dim if i == 0 else width, width) for i in range(depth)))
        self.pool = nn.AdaptiveAvgPool2d(out_side)
        self.after = nn.Sequential(*(ResBlock(width, width) for _ in range(depth)))
        self.readout = mlp(width, out_dim, mlp_depth, nn.SiLU)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        grid = tokens_to_grid(features, self.side)
        if self.pos_emb is not None:
            grid = grid + tokens_to_grid(self.pos_emb, self.side)
        grid = self.after(self.pool(self.before(grid)))
        return self.readout(grid_to_tokens(grid))


CONNECTORS.register("c_abstractor", CAbstractor)
