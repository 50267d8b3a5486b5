"""Average-pool token compression: pool the square token grid, then project each pooled token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmkit.models.connectors.base import CONNECTORS, Connector, check_dims, grid_to_tokens, mlp, square_side, tokens_to_grid

PROJECTORS = {"linear": 1, "mlp2x_gelu": 2}  # projector -> linear layers


class AvgPoolConnector(Connector):
    """Average-pool stride x stride blocks of the token grid, then project (linear or 2-layer MLP).

    Pooling before projecting keeps the projection cheap: it runs on ``stride^2`` times fewer tokens.

    Args:
        in_dim: vision token width. out_dim: language hidden size.
        num_input_tokens: tokens per image; must be a square ``S * S`` with ``S % stride == 0``.
        stride: pooling window and step per side.
        projector: ``linear`` or ``mlp2x_gelu`` (Linear, GELU, Linear as LLaVA-1.5).

    Shapes: ``(B, S*S, in_dim) -> (B, (S/stride)^2, out_dim)``.

    Raises:
        ValueError: at build time when ``num_input_tokens`` is not a square, ``stride`` does not
            divide its side, or ``projector`` is unknown.
    """

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int, stride: int = 2, projector: str = "mlp2x_gelu"):
        super().__init__()
        check_dims("avgpool", in_dim, out_dim)
        self.side = square_side("avgpool", num_input_tokens)
        if stride < 1 or self.side % stride:
            raise ValueError(f"connector 'avgpool' option stride={stride} must be >= 1 and divide the token grid side; "
                             f"the vision encoder emits {num_input_tokens} tokens ({self.side}x{self.side})")
        if projector not in PROJECTORS:
            raise ValueError(f"connector 'avgpool' option projector={projector!r} is unknown; valid: {', '.join(PROJECTORS)}")
        self.stride = stride
        self.num_output_tokens = (self.side // stride) ** 2
        self.proj = mlp(in_dim, out_dim, PROJECTORS[projector])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(tokens_to_grid(features, self.side), self.stride)
        return self.proj(grid_to_tokens(pooled))


CONNECTORS.register("avgpool", AvgPoolConnector)
