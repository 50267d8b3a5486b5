"""Flamingo Perceiver resampler connector: learned latents summarise any number of image tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.models.connectors.base import CONNECTORS, Connector, check_dims, check_options_positive


class PerceiverAttention(nn.Module):
    """Latents attend to ``concat(image tokens, latents)`` (Flamingo): keys/values come from both.

    Letting the latents also attend to themselves lets each one keep its own content when the image
    offers nothing relevant. Pre-LN: both inputs are normalised first.

    Shapes: ``media (B, N, width)``, ``latents (B, L, width) -> (B, L, width)``.
    """

    def __init__(self, width: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.media_norm = nn.LayerNorm(width)
        self.latent_norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, num_heads * head_dim, bias=False)
        self.to_kv = nn.Linear(width, 2 * num_heads * head_dim, bias=False)
        self.to_out = nn.Linear(num_heads * head_dim, width, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, num_latents, _ = latents.shape
        latents = self.latent_norm(latents)
        keys, values = self.to_kv(torch.cat([self.media_norm(media), latents], dim=1)).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(latents)), heads(keys), heads(values))
        return self.to_out(out.transpose(1, 2).reshape(b, num_latents, self.num_heads * self.head_dim))


class PerceiverResampler(Connector):
    """Flamingo Perceiver resampler: num_latents learned latents cross-attend to the image (fixed count).

    Args:
        in_dim: vision token width. out_dim: language hidden size.
        num_input_tokens: tokens per image; unused, any ``N`` works.
        num_latents: learned latents = output tokens (Flamingo: 64).
        depth: attention + feed-forward layers (Flamingo: 6).
        num_heads / head_dim: attention heads and their width (Flamingo: 8 x 64).
        ff_mult: feed-forward expansion factor.
        hidden_size: resampler width; default ``in_dim`` (image tokens are projected when it differs).

    Shapes: ``(B, N, in_dim) -> (B, num_latents, out_dim)``.

    Raises:
        ValueError: a size option below 1.
    """

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int, num_latents: int = 64, depth: int = 6,
                 num_heads: int = 8, head_dim: int = 64, ff_mult: int = 4, hidden_size: int | None = None):
        super().__init__()
        check_dims("resampler", in_dim, out_dim)
        check_options_positive("resampler", num_latents=num_latents, depth=depth, num_heads=num_heads,
                               head_dim=head_dim, ff_mult=ff_mult, hidden_size=hidden_size)
        width = hidden_size or in_dim
        self.num_output_tokens = num_latents
        self.input_proj = nn.Linear(in_dim, width) if width != in_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(num_latents, width))
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "attn": PerceiverAttention(width, num_heads, head_dim),
                "ff": nn.Sequential(
                    nn.LayerNorm(width), nn.Linear(width, width * ff_mult, bias=False), nn.GELU(),
                    nn.Linear(width * ff_mult, width, bias=False),
                ),
            })
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        media = self.input_proj(features)
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = latents + layer["attn"](media, latents)
            latents = latents + layer["ff"](latents)
        return self.proj(self.norm(latents))


CONNECTORS.register("resampler", PerceiverResampler)
