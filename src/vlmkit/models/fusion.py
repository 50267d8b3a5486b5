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
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmkit.models.language.base import LanguageModel
from vlmkit.registry import Registry

FusionFactory = Callable[..., "Fusion"]
FUSIONS: Registry[FusionFactory] = Registry("fusion")


class Fusion(nn.Module, abc.ABC):
    """Puts visual features ``(num_images, M, H)`` into the language model's computation.

    A fusion holds no per-call state: what a call needs besides the input embeddings (the
    cross-attention's visual context) is returned by :meth:`embed` as keyword arguments for the
    language model's forward, and travels with the call.
    """

    @abc.abstractmethod
    def tokens_per_image(self, num_visual_tokens: int) -> int:
        """How many placeholder tokens one image occupies in the text sequence."""

    @abc.abstractmethod
    def embed(
        self, language: LanguageModel, input_ids: torch.Tensor, is_image: torch.Tensor,
        features: torch.Tensor | None, image_counts: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Input embeddings ``(B, T, H)`` for ``input_ids`` ``(B, T)`` and the extra keyword
        arguments of the language model's forward (empty for prefix fusion).

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
        return embeds, {}


#: keyword under which the cross-attention context travels through the language model's forward
#: (transformers' decoder models pass unknown keywords on to every decoder layer; the layer hook
#: takes it out before the layer runs)
MEDIA_KWARG = "vlm_media"


class MediaContext:
    """The visual context of one call of a cross-attention model: ``media`` ``(B, L, H)`` and
    ``mask`` ``(B, L)`` (True = a real visual token).

    Without gradients (inference) each block's projected keys and values are computed once and
    kept here, so a generation's decode steps reuse them; a context belongs to one call or one
    request, never to a module.
    """

    def __init__(self, media: torch.Tensor, mask: torch.Tensor, kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.media = media
        self.mask = mask
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = dict(kv or {})

    @property
    def batch_size(self) -> int:
        return self.media.shape[0]

    def keys_values(self, index: int, block: "GatedCrossAttentionBlock") -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index``'s keys and values ``(B, heads, L, H/heads)``, cached when no gradient is taken."""
        if index in self.kv:
            return self.kv[index]
        kv = block.project_media(self.media)
        if not torch.is_grad_enabled():
            self.kv[index] = kv
        return kv

    def select(self, rows: list[int] | torch.Tensor) -> "MediaContext":
        """The context of the given rows (their cached keys and values kept)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.media.device)
        return MediaContext(self.media[rows], self.mask[rows], {i: (k[rows], v[rows]) for i, (k, v) in self.kv.items()})

    @staticmethod
    def concat(contexts: list["MediaContext"]) -> "MediaContext":
        """One batch of several contexts, rows in order; shorter media are padded (masked out).

        Cached keys/values are kept for the blocks every context has cached.
        """
        longest = max(c.media.shape[1] for c in contexts)

        def pad(t: torch.Tensor, dim: int, value: float | bool = 0) -> torch.Tensor:
            extra = longest - t.shape[dim]
            if not extra:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_full(shape, value)], dim=dim)

        media = torch.cat([pad(c.media, 1) for c in contexts])
        mask = torch.cat([pad(c.mask, 1, False) for c in contexts])
        shared = set.intersection(*(set(c.kv) for c in contexts))
        kv = {
            i: (torch.cat([pad(c.kv[i][0], 2) for c in contexts]), torch.cat([pad(c.kv[i][1], 2) for c in contexts]))
            for i in shared
        }
        return MediaContext(media, mask, kv)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated block: ``x + tanh(a) * XAttn(LN(x), media)``, then ``x + tanh(b) * FFN(LN(x))``.

    Shapes: ``x`` ``(B, T, H)``; the context's ``media`` ``(B, L, H)`` and ``mask`` ``(B, L)``. Rows
    without any visual token get no cross-attention update. The attention weights are stored as
    ``nn.MultiheadAttention``'s (``attn.in_proj_*``, ``attn.out_proj``).
    """

    def __init__(self, hidden: int, heads: int, ff_mult: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"fusion option heads={heads} must divide the language hidden size {hidden}")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, ff_mult * hidden), nn.GELU(), nn.Linear(ff_mult * hidden, hidden))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, h = t.shape
        return t.view(b, n, self.heads, h // self.heads).transpose(1, 2)

    def project_media(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, heads, L, H/heads)`` of ``media`` ``(B, L, H)``."""
        w = self.attn.in_proj_weight.chunk(3)
        b = self.attn.in_proj_bias.chunk(3)
        return self._split(F.linear(media, w[1], b[1])), self._split(F.linear(media, w[2], b[2]))

    def forward(self, x: torch.Tensor, context: MediaContext, index: int = -1) -> torch.Tensor:
        k, v = context.keys_values(index, self) if index >= 0 else self.project_media(context.media)
        w, b = self.attn.in_proj_weight.chunk(3)[0], self.attn.in_proj_bias.chunk(3)[0]
        q = self._split(F.linear(self.attn_norm(x), w, b))
        has_media = context.mask.any(dim=1)
        # rows without media attend to everything (never an all-masked softmax) and are zeroed below
        allowed = (context.mask | ~has_media[:, None])[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed)
        attended = self.attn.out_proj(attended.transpose(1, 2).reshape(x.shape))
        attended = torch.where(has_media.view(-1, 1, 1), attended, torch.zeros_like(attended))
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
    own weights, state dict and ``save_pretrained`` format are untouched. The visual context is a
    :class:`MediaContext` passed to the language model's forward as the keyword ``vlm_media``
    (returned by :meth:`embed`); transformers hands it to every decoder layer, where the hook takes
    it out, so it is part of the call (gradient checkpointing recomputes a layer with it) and
    concurrent calls never see each other's images. Every text token attends to all images of its
    row (Flamingo restricts a token to the latest preceding image; with one image per sample the
    two agree after the image).

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

    def tokens_per_image(self, num_visual_tokens: int) -> int:
        return 1

    def _attach(self, language: LanguageModel) -> None:
        """Make layer ``i`` of the language model run block ``k`` first (``i = layer_ids[k]``).

        The hook is one stateless function; which fusion and block a layer runs is an attribute of
        the layer (not a submodule: the state dict is untouched), so a deep copy of the whole model
        (FSDP's and DeepSpeed's plain copy after a stage) runs its own blocks, not the original's."""
        layers = decoder_layers(language.hf_model)
        for k, i in enumerate(self.layer_ids):
            layer = layers[i]
            if not getattr(layer, "_vlm_hooked", False):
                layer.register_forward_pre_hook(_run_block, with_kwargs=True)
                object.__setattr__(layer, "_vlm_hooked", True)
            object.__setattr__(layer, "_vlm_block", (self, k))

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in the backward pass (the blocks run in the layers' pre-hooks,
        outside the ``forward`` transformers checkpoints, so they are checkpointed here)."""
        self.checkpointed = True

    def embed(self, language, input_ids, is_image, features, image_counts):
        self._attach(language)
        embeds = language.embed(input_ids)
        if features is None:
            # no image in the batch: an empty, masked-out context, so the blocks run exactly as for
            # the rows without images of a mixed batch (no attention update; the gated FFN still runs)
            b = input_ids.shape[0]
            empty = MediaContext(embeds.new_zeros(b, 1, embeds.shape[-1]), torch.zeros(b, 1, dtype=torch.bool, device=embeds.device))
            return embeds, {MEDIA_KWARG: empty}
        b, m, h = input_ids.shape[0], features.shape[1], features.shape[-1]
        counts = image_counts.tolist()  # read once (one device sync); `vlmkit plan` traces with fake tensors around it
        most = max(counts, default=0)
        media = features.new_zeros(b, max(most, 1) * m, h)
        mask = torch.zeros(b, max(most, 1) * m, dtype=torch.bool, device=features.device)
        start = 0
        for row, count in enumerate(counts):
            media[row, : count * m] = features[start : start + count].reshape(-1, h)
            mask[row, : count * m] = True
            start += count
        return embeds, {MEDIA_KWARG: MediaContext(media.to(embeds.dtype), mask)}


def _run_block(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a language-model layer: the gated cross-attention block ``layer._vlm_block``
    names runs on the hidden states first, with the call's ``vlm_media`` context (none: the layer runs alone)."""
    context = kwargs.pop(MEDIA_KWARG, None)
    if context is None:
        return args, kwargs
    fusion, index = layer._vlm_block
    block = fusion.blocks[index]
    hidden = args[0] if args else kwargs["hidden_states"]
    if getattr(fusion, "checkpointed", False) and torch.is_grad_enabled():
        out = checkpoint(block, hidden, context, index, use_reentrant=False)
    else:
        out = block(hidden, context, index)
    if args:
        return (out, *args[1:]), kwargs
    kwargs["hidden_states"] = out
    return args, kwargs


FUSIONS.register("prefix", lambda language, **options: PrefixFusion(**options))
FUSIONS.register("cross_attention", GatedCrossAttentionFusion)
