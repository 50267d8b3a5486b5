"""Fusion styles: how visual tokens reach the language model.

* ``prefix`` (LLaVA): each image's visual tokens replace its placeholder tokens in the sequence.
* ``cross_attention`` (Flamingo / IDEFICS): the ``<image>`` placeholder stays one ordinary token;
  tanh-gated cross-attention blocks, inserted before every ``every``-th layer of the language model,
  let text tokens attend to the visual tokens. Gates start at zero, so at initialisation the model
  computes exactly what the bare language model computes.

A fusion is built by ``factory(language, **options)`` and is a part of the model (``fusion``) with
its own trainability policy; ``prefix`` has no weights.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlmkit.models.language.base import LanguageModel
from vlmkit.registry import Registry

FusionFactory = Callable[..., "Fusion"]
FUSIONS: Registry[FusionFactory] = Registry("fusion")


class Fusion(nn.Module, abc.ABC):
    """Puts visual features ``(num_images, M, H)`` into the language model's computation."""

    @abc.abstractmethod
    def tokens_per_image(self, num_visual_tokens: int) -> int:
        """How many placeholder tokens one image occupies in the text sequence."""

    @abc.abstractmethod
    def embed(
        self, language: LanguageModel, input_ids: torch.Tensor, is_image: torch.Tensor,
        features: torch.Tensor | None, image_counts: torch.Tensor,
    ) -> torch.Tensor:
        """Input embeddings ``(B, T, H)`` for ``input_ids`` ``(B, T)``.

        Args:
            is_image: ``(B, T)`` placeholder positions.
            features: ``(num_images, M, H)`` in row order, or ``None`` without images.
            image_counts: ``(B,)`` images per row.
        """


class PrefixFusion(Fusion):
    """LLaVA-style: visual tokens spliced into the sequence at the placeholders (``masked_scatter``)."""

    def tokens_per_image(self, num_visual_tokens: int) -> int:
        return num_visual_tokens

    def embed(self, language, input_ids, is_image, features, image_counts):
        embeds = language.embed(input_ids.masked_fill(is_image, 0))
        if features is not None:
            feats = features.to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
        return embeds


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated block: ``x + tanh(a) * XAttn(LN(x), media)``, then ``x + tanh(b) * FFN(LN(x))``.

    Shapes: ``x`` ``(B, T, H)``; ``media`` ``(B, L, H)``; ``media_mask`` ``(B, L)`` (True = a real
    visual token). Rows without any visual token get no cross-attention update.
    """

    def __init__(self, hidden: int, heads: int, ff_mult: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"fusion option heads={heads} must divide the language hidden size {hidden}")
        self.attn_norm = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, ff_mult * hidden), nn.GELU(), nn.Linear(ff_mult * hidden, hidden))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attn(self.attn_norm(x), media, media, key_padding_mask=~media_mask, need_weights=False)
        has_media = media_mask.any(dim=1).view(-1, 1, 1)
        attended = torch.where(has_media, attended, torch.zeros_like(attended))
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * attended
        return x + torch.tanh(self.ff_gate).to(x.dtype) * self.ff(self.ff_norm(x))


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM: the longest ``ModuleList`` under its base model.

    Raises:
        ValueError: the model has no layer list (names the model class).
    """
    lists = [m for m in hf_model.base_model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(hf_model).__name__} has no list of layers to insert cross-attention blocks into")
    return max(lists, key=len)


class GatedCrossAttentionFusion(Fusion):
    """Flamingo-style fusion for decoder-only language models.

    Args:
        language: the (usually frozen) decoder-only language model.
        every: insert a block before every ``every``-th layer (Flamingo: 1 for small, 4-7 for large models).
        heads: attention heads of the blocks (default: the language model's).
        ff_mult: feed-forward width multiplier of the blocks.

    The blocks run as forward pre-hooks of the language model's layers, so the language model's
    own weights, state dict and ``save_pretrained`` format are untouched. The visual context of the
    latest call stays set until the next one (gradient checkpointing recomputes layers in backward).
    Every text token attends to all images of its row (Flamingo restricts a token to the latest
    preceding image; with one image per sample the two agree after the image).

    Raises:
        ValueError: the language model is not decoder-only, or ``every`` / ``heads`` do not fit it.
    """

    def __init__(self, language: LanguageModel, every: int = 1, heads: int | None = None, ff_mult: int = 4):
        super().__init__()
        if language.spec.kind != "decoder":
            raise ValueError(
                f"fusion 'cross_attention' needs a decoder-only language model; {language.spec.name!r} is {language.spec.kind} "
                "(use fusion 'prefix')"
            )
        n_layers = len(decoder_layers(language.hf_model))
        if every < 1 or every > n_layers:
            raise ValueError(f"fusion option every={every} must be between 1 and the language model's {n_layers} layers")
        hidden = language.hidden_size
        heads = heads or int(getattr(language.config, "num_attention_heads", 1))
        self.every = every
        self.layer_ids = list(range(0, n_layers, every))
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(hidden, heads, ff_mult) for _ in self.layer_ids)
        self.to(language.dtype)
        self._context: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hooked: list[nn.ModuleList] = []  # a plain list: an attribute would register the LM's layers here
        self._handles: list[Any] = []

    def tokens_per_image(self, num_visual_tokens: int) -> int:
        return 1

    def _attach(self, language: LanguageModel) -> None:
        layers = decoder_layers(language.hf_model)
        if self._hooked and self._hooked[0] is layers:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = [
            layers[i].register_forward_pre_hook(self._hook(block), with_kwargs=True) for i, block in zip(self.layer_ids, self.blocks)
        ]
        self._hooked = [layers]

    def _hook(self, block: GatedCrossAttentionBlock):
        def run(module: nn.Module, args: tuple, kwargs: dict):
            if self._context is None:
                return None
            media, mask = self._context
            if args:
                return (block(args[0], media, mask), *args[1:]), kwargs
            kwargs["hidden_states"] = block(kwargs["hidden_states"], media, mask)
            return args, kwargs

        return run

    def embed(self, language, input_ids, is_image, features, image_counts):
        self._attach(language)
        embeds = language.embed(input_ids)
        if features is None:
            self._context = None
            return embeds
        b, m, h = input_ids.shape[0], features.shape[1], features.shape[-1]
        most = int(image_counts.max()) if image_counts.numel() else 0
        media = features.new_zeros(b, max(most, 1) * m, h)
        mask = torch.zeros(b, max(most, 1) * m, dtype=torch.bool, device=features.device)
        start = 0
        for row, count in enumerate(image_counts.tolist()):
            media[row, : count * m] = features[start : start + count].reshape(-1, h)
            mask[row, : count * m] = True
            start += count
        self._context = (media.to(embeds.dtype), mask)
        return embeds


FUSIONS.register("prefix", lambda language, **options: PrefixFusion(**options))
FUSIONS.register("cross_attention", GatedCrossAttentionFusion)
