"""MobileVLM's lightweight downsample projectors: ``ldp`` (v1) and ``ldpv2`` (v2).

Both first project every token with an MLP, then work on the 2D token grid and return a quarter of
the tokens: ``ceil(S/2)^2`` for an ``S x S`` grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.models.connectors.base import (
    CONNECTORS,
    Connector,
    LayerNorm2d,
    check_dims,
    grid_to_tokens,
    mlp,
    square_side,
    tokens_to_grid,
)


class SqueezeExcite(nn.Module):
    """Channel gating from the mean over the grid (MobileNetV3): ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * F.hardsigmoid(gate)


class MobileBlock(nn.Module):
    """MobileNetV3 inverted residual at expansion 1: pointwise, depthwise 3x3 (stride), SE, pointwise.

    LayerNorm over channels as MobileVLM (not BatchNorm), residual only when the grid keeps its size.

    Shapes: ``(B, C, S, S) -> (B, C, ceil(S / stride), ceil(S / stride))``.
    """

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False),
            LayerNorm2d(channels), nn.Hardswish(),
        )
        self.excite = SqueezeExcite(channels)
        self.project = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels))
        self.residual = stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.excite(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class LDPConnector(Connector):
    """MobileVLM LDP: token MLP, then a stride-1 and a stride-2 MobileNet block on the grid (tokens / 4).

    Args:
        in_dim: vision token width. out_dim: language hidden size.
        num_input_tokens: tokens per image; must be a square ``S * S``.

    Shapes: ``(B, S*S, in_dim) -> (B, ceil(S/2)^2, out_dim)`` (576 -> 144).

    Raises:
        ValueError: at build time when ``num_input_tokens`` is not a square; at run time when the
            features have a different token count than the connector was built for.
    """

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int):
        super().__init__()
        check_dims("ldp", in_dim, out_dim)
        self.side = square_side("ldp", num_input_tokens)
        # A 3x3 conv with padding 1 and stride 2 gives floor((S - 1) / 2) + 1 = ceil(S / 2) per side.
        self.num_output_tokens = ((self.side + 1) // 2) ** 2
        self.mlp = mlp(in_dim, out_dim)
        self.blocks = nn.Sequential(MobileBlock(out_dim, stride=1), MobileBlock(out_dim, stride=2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return grid_to_tokens(self.blocks(tokens_to_grid(self.mlp(features), self.side)))


class LDPv2Connector(Connector):
    """MobileVLM v2 LDP: token MLP, 2x2 average pooling on the grid (tokens / 4), PEG conv with residual.

    The positional-encoding generator (a depthwise 3x3 conv added back to its input) restores the
    spatial cues that pooling blurs.

    Args:
        in_dim: vision token width. out_dim: language hidden size.
        num_input_tokens: tokens per image; must be a square ``S * S``.

    Shapes: ``(B, S*S, in_dim) -> (B, ceil(S/2)^2, out_dim)`` (576 -> 144); on an odd side the
    pooling windows overlap by one token (adaptive pooling) so the count matches ``ldp``.

    Raises:
        ValueError: as :class:`LDPConnector`.
    """

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int):
        super().__init__()
        check_dims("ldpv2", in_dim, out_dim)
        self.side = square_side("ldpv2", num_input_tokens)
        self.out_side = (self.side + 1) // 2
        self.num_output_tokens = self.out_side ** 2
        self.mlp = mlp(in_dim, out_dim)
        self.peg = nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # On an even side adaptive pooling is exactly a 2x2 / stride-2 average pool.
        grid = F.adaptive_avg_pool2d(tokens_to_grid(self.mlp(features), self.side), self.out_side)
        return grid_to_tokens(grid + self.peg(grid))


CONNECTORS.register("ldp", LDPConnector)
CONNECTORS.register("ldpv2", LDPv2Connector)
