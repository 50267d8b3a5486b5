"""Connector interface and registry.

A connector maps visual tokens ``(B, N, D_vision)`` to ``(B, M, D_language)``. Every connector is
built by the same call, ``factory(in_dim, out_dim, num_input_tokens, **options)``, and reports how
many tokens it emits so the processor can expand the image placeholder to exactly that many.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
from torch import nn

from vlmkit.registry import Registry

ConnectorFactory = Callable[..., "Connector"]
CONNECTORS: Registry[ConnectorFactory] = Registry("connector")


class Connector(nn.Module, abc.ABC):
    """Base class: subclasses set ``num_output_tokens`` and implement ``forward``."""

    num_output_tokens: int

    @abc.abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``(B, N, D_vision)`` to ``(B, num_output_tokens, D_language)``."""

    def saved_options(self, options: dict) -> dict:
        """The options a saved model records to rebuild this connector before loading its weights
        (a connector initialised from an outside checkpoint replaces that source by its shapes)."""
        return dict(options)


class TokenMerge(nn.Module):
    """Concatenate each ``k x k`` block of a square token grid into one token (pixel-unshuffle).

    Reduces ``N`` tokens of width ``D`` to ``N / k^2`` tokens of width ``D * k^2`` without losing
    information, as InternVL and Idefics3 do before their projectors.

    Shapes: ``(B, N, D) -> (B, N / k^2, D * k^2)`` with ``N = S^2`` and ``S % k == 0``.

    ``k = 1`` passes any sequence through unchanged.

    Raises:
        ValueError: at build time if ``k > 1`` and ``num_input_tokens`` is not a square whose side ``k`` divides.
    """

    def __init__(self, factor: int, num_input_tokens: int):
        super().__init__()
        side = math.isqrt(num_input_tokens)
        if factor < 1 or (factor > 1 and (side * side != num_input_tokens or side % factor)):
            raise ValueError(
                f"connector option merge={factor} needs a square token grid whose side it divides; "
                f"the vision encoder emits {num_input_tokens} tokens"
                + (f" ({side}x{side})" if side * side == num_input_tokens else " (not a square)")
            )
        self.factor = factor
        self.side = side
        self.num_output_tokens = num_input_tokens // (factor * factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor == 1:
            return x
        b, n, d = x.shape
        k, s = self.factor, self.side
        x = x.reshape(b, s // k, k, s // k, k, d).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (s // k) ** 2, k * k * d)


def check_dims(name: str, in_dim: int, out_dim: int) -> None:
    """Raise a build-time error for non-positive widths instead of failing deep in a matmul."""
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"connector {name!r} needs positive widths, got vision {in_dim} -> language {out_dim}")


def check_options_positive(name: str, **options: int | None) -> None:
    """Raise a build-time error naming the first size option below 1 (``None`` means "default")."""
    for option, value in options.items():
        if value is not None and value < 1:
            raise ValueError(f"connector {name!r} option {option}={value} must be >= 1")


def mlp(in_dim: int, out_dim: int, depth: int = 2, activation: type[nn.Module] = nn.GELU) -> nn.Module:
    """``depth`` linear layers, ``in_dim -> out_dim`` then ``out_dim -> out_dim``, with ``activation``
    between them; ``depth=1`` is a bare ``nn.Linear``.

    Shapes: ``(..., in_dim) -> (..., out_dim)``.
    """
    if depth == 1:
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [activation(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def square_side(name: str, num_input_tokens: int) -> int:
    """Return the side ``S`` of a square token grid with ``S * S == num_input_tokens``.

    Raises:
        ValueError: ``num_input_tokens`` is not a positive perfect square; the message names the
            connector and the count, and suggests dropping the CLS token when that would fix it.
    """
    side = math.isqrt(num_input_tokens) if num_input_tokens > 0 else 0
    if side == 0 or side * side != num_input_tokens:
        hint = ""
        below = math.isqrt(num_input_tokens - 1) if num_input_tokens > 1 else 0
        if below and below * below == num_input_tokens - 1:
            hint = f"; {below}x{below} patches plus one token: drop the CLS token (model.vision.drop_cls: true)"
        raise ValueError(
            f"connector {name!r} needs a square token grid, but the vision encoder emits "
            f"{num_input_tokens} tokens (not a square){hint}"
        )
    return side


def tokens_to_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """Lay row-major tokens out as an image: ``(B, S*S, D) -> (B, D, S, S)``.

    Raises:
        ValueError: the sequence length is not ``side * side`` (the tower emits a different count
            than the connector was built for).
    """
    b, n, d = tokens.shape
    if n != side * side:
        raise ValueError(f"connector was built for a {side}x{side} token grid ({side * side} tokens), got {n} tokens")
    return tokens.transpose(1, 2).reshape(b, d, side, side)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tokens_to_grid`: ``(B, D, H, W) -> (B, H*W, D)`` row-major."""
    return grid.flatten(2).transpose(1, 2)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a ``(B, C, H, W)`` map (ConvNeXt-style).

    Unlike BatchNorm it does not depend on the batch, so a connector behaves the same at batch size
    1, in eval mode and when training with gradient accumulation.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
