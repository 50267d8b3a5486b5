"""Projector connectors: ``linear`` (LLaVA v1) and ``mlp{N}x_gelu`` (LLaVA-1.5, Bunny)."""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.models.connectors.base import CONNECTORS, Connector, TokenMerge, check_dims, mlp


class LinearConnector(Connector):
    """One linear map per token (LLaVA v1's projector).

    Args:
        in_dim: vision token width. out_dim: language hidden size.
        num_input_tokens: tokens per image from the vision encoder.
        merge: fuse each ``merge x merge`` block of tokens into one before projecting (1 = off).

    Shapes: ``(B, N, in_dim) -> (B, N / merge^2, out_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int, merge: int = 1):
        super().__init__()
        check_dims("linear", in_dim, out_dim)
        self.merge = TokenMerge(merge, num_input_tokens)
        self.num_output_tokens = self.merge.num_output_tokens
        self.proj = nn.Linear(in_dim * merge * merge, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.merge(features))


class MLPConnector(Connector):
    """``depth`` linear layers with GELU between them (``mlp2x_gelu`` is depth 2, as LLaVA-1.5).

    Args:
        in_dim / out_dim / num_input_tokens / merge: as :class:`LinearConnector`.
        depth: number of linear layers (>= 2).

    Shapes: ``(B, N, in_dim) -> (B, N / merge^2, out_dim)``.
    """

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int, depth: int = 2, merge: int = 1):
        super().__init__()
        check_dims(f"mlp{depth}x_gelu", in_dim, out_dim)
        if depth < 2:
            raise ValueError(f"mlp connector depth must be >= 2 (use 'linear' for 1), got {depth}")
        self.merge = TokenMerge(merge, num_input_tokens)
        self.num_output_tokens = self.merge.num_output_tokens
        self.mlp = mlp(in_dim * merge * merge, out_dim, depth)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.merge(features))


CONNECTORS.register("linear", LinearConnector)
for _depth in (2, 3):
    CONNECTORS.register(
        f"mlp{_depth}x_gelu",
        lambda in_dim, out_dim, num_input_tokens, _d=_depth, **kw: MLPConnector(in_dim, out_dim, num_input_tokens, depth=_d, **kw),
    )
