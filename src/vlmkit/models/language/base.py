"""Language backbone families and the adapter interface the VLM talks to.

A family is registry data: which Hugging Face ``model_type`` values it accepts, its config class,
its architecture kind, default chat template, LoRA targets and how to read its hidden size. Each
kind has one adapter (decoder-only here, encoder-decoder in :mod:`.seq2seq`, encoder-only in
:mod:`.encoder`) that gives the VLM one narrow interface whatever the family: embed ids, compute the
training loss on embeddings, logits, generate.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.registry import ANY_MODEL_TYPE, Registry

IGNORE_INDEX = -100
KINDS = ("decoder", "encoder-decoder", "encoder")
HEADS_FILE = "heads.safetensors"  # task heads saved beside a transformers model folder


def has_causal_lm(model_type: str, hf_config: Any = None) -> bool:
    """Whether ``AutoModelForCausalLM`` can build ``model_type`` (natively, or through the remote
    code a config's ``auto_map`` names)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    remote = getattr(hf_config, "auto_map", None) or {}
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in remote


@dataclass(frozen=True)
class BackboneSpec:
    """One language backbone family.

    Attributes:
        name: registry id.
        model_types: Hugging Face ``model_type`` values of this family; ``*`` accepts any model_type
            with an ``AutoModelForCausalLM`` class (the generic decoder-only family).
        config_class: transformers config class used to build a model from scratch; empty when the
            class follows from ``model.language.config.model_type`` (generic family).
        kind: ``decoder`` (causal LM), ``encoder-decoder`` (seq2seq LM) or ``encoder`` (bidirectional
            encoder; discriminative tasks only).
        default_template: chat template of ``template: auto`` when the tokenizer has none
            (``tokenizer``: the family needs a tokenizer with its own chat template).
        lora_targets: module names LoRA adapts by default; empty: every linear layer (peft's ``all-linear``).
        hidden_size_field: config attribute holding the width of the token embeddings (the width
            the connector must produce): ``hidden_size``, T5's ``d_model``, OPT's ``word_embed_proj_dim``;
            several joined by ``|`` are tried in order.
        plain_head: logits are exactly ``lm_head(final hidden state)``, so the loss may project only
            the labelled positions (no soft-capping or logit scaling in the family's forward).
        sizes: typical released sizes, for ``vlmkit list backbones``.
        used_by: multimodal models built on this family.
        example: a real checkpoint id.
        defaults: config fields applied before the recipe's when building from scratch.
        presets: named architecture shapes (``model.language.preset``) for building from scratch.
        pretrained_weights: ``False`` when no weights were ever published; only folders you saved load.
        notes: one line on what the family entry adapts (shown by ``vlmkit list backbones``).
    """

    name: str
    model_types: tuple[str, ...]
    config_class: str
    kind: str = "decoder"
    default_template: str = "chatml"
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    hidden_size_field: str = "hidden_size"
    plain_head: bool = True
    sizes: str = ""
    used_by: str = ""
    example: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    pretrained_weights: bool = True
    notes: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"backbone {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if ANY_MODEL_TYPE in self.model_types and self.kind != "decoder":
            raise ValueError(f"backbone {self.name!r}: model_types '*' is only for decoder-only families")

    @property
    def generic(self) -> bool:
        """Whether the family takes any causal-LM ``model_type`` (``*``) rather than a fixed list."""
        return ANY_MODEL_TYPE in self.model_types

    def accepts(self, model_type: str, hf_config: Any = None) -> bool:
        """Whether a checkpoint or config of ``model_type`` belongs to this family."""
        return model_type in self.model_types or (self.generic and has_causal_lm(model_type, hf_config))

    def read_hidden_size(self, config: Any) -> int:
        """The token-embedding width from ``config`` through :attr:`hidden_size_field`.

        Raises:
            ValueError: the config has none of the fields.
        """
        fields = self.hidden_size_field.split("|")
        for name in fields:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        raise ValueError(f"{type(config).__name__} has none of the width fields {', '.join(fields)} ({self.name} backbone)")


BACKBONES: Registry[BackboneSpec] = Registry("language backbone")


def families_for_model_type(model_type: str) -> list[str]:
    """Ids of the families that list ``model_type`` by name; families whose weights were published
    come first (so a Llama checkpoint maps to ``llama``, never to the weightless ``chinchilla``)."""
    named = [(not spec.pretrained_weights, name) for name, spec in BACKBONES.items() if model_type in spec.model_types]
    return [name for _, name in sorted(named)]


def family_for_model_type(model_type: str, hf_config: Any = None) -> str:
    """The family to use for ``model_type``: the first of :func:`families_for_model_type`, else a
    generic family (``*``) when transformers has a causal LM for it.

    Raises:
        ValueError: no family accepts it; the message lists the supported model types.
    """
    named = families_for_model_type(model_type)
    if named:
        return named[0]
    generic = [name for name, spec in BACKBONES.items() if spec.generic and spec.accepts(model_type, hf_config)]
    if generic:
        return generic[0]
    supported = sorted({t for _, s in BACKBONES.items() for t in s.model_types if t != ANY_MODEL_TYPE})
    any_families = [name for name, spec in BACKBONES.items() if spec.generic]
    also = f"; {', '.join(any_families)} takes any model_type with an AutoModelForCausalLM class" if any_families else ""
    raise ValueError(
        f"model_type {model_type!r} has no language backbone family; supported: {', '.join(supported)}{also}"
    )


def family_hint(model_type: str, hf_config: Any = None) -> str:
    """``use model.language.backbone=ID`` plus every family that accepts ``model_type``, for errors
    about a checkpoint given to the wrong family."""
    best = family_for_model_type(model_type, hf_config)
    named = families_for_model_type(model_type)
    if not named:
        return f"use model.language.backbone={best} (no family lists {model_type!r}; {best} takes any AutoModelForCausalLM)"
    labels = [n if BACKBONES.get(n).pretrained_weights else f"{n} (no published weights; only folders you saved)" for n in named]
    return f"use model.language.backbone={best} (families that accept {model_type!r}: {', '.join(labels)})"


class NotGenerativeError(ValueError):
    """The backbone cannot generate text (encoder-only); the message says what it can do instead."""


@dataclass
class LossOutput:
    """The summed loss over a batch's targets (tokens, or rows for classification) and their number.

    The sum, not the mean, is what the trainer needs: it divides by the target count of the whole
    global batch (all micro-batches, all processes), so the gradient does not depend on the split."""

    total: torch.Tensor
    count: int

    @property
    def loss(self) -> torch.Tensor:
        """The mean over the targets (0 without targets)."""
        return self.total / max(self.count, 1)


class LanguageModel(nn.Module, abc.ABC):
    """Adapter around a Hugging Face model (optionally wrapped by peft).

    Args:
        model: the transformers model (its class depends on the family's kind).
        spec: its family.

    ``model`` is the attribute LoRA wraps; weights outside it (task heads) are listed by
    :meth:`extra_state` so stages and model folders save them too. ``embeddings_resized`` is True
    when pretrained embeddings were grown for the tokenizer's added tokens; LoRA adapters then carry
    the grown embeddings, so the adapter folder holds every weight that differs from the checkpoint.
    """

    auto_class = "AutoModelForCausalLM"
    model_kwargs: dict[str, Any] = {}

    def __init__(self, model: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self.embeddings_resized = False

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model, unwrapped from peft if LoRA is applied."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @property
    def config(self) -> Any:
        return self.hf_model.config

    @property
    def hidden_size(self) -> int:
        """Width of the token embeddings, read from the family's ``hidden_size_field``."""
        return self.spec.read_hidden_size(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(B, T) -> (B, T, H)``."""
        return self.hf_model.get_input_embeddings()(input_ids)

    # -- weights outside the transformers model -------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors that live outside ``model`` (task heads); empty for generative kinds."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved from :meth:`extra_state`."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters outside ``model``; they train whenever the part is not frozen (also under LoRA)."""
        return []

    def save_pretrained(self, folder: str | Path) -> None:
        """The transformers model in its own format plus ``heads.safetensors`` when there are heads."""
        self.hf_model.save_pretrained(folder)
        self.save_heads(folder)

    def save_heads(self, folder: str | Path) -> None:
        """Write :meth:`extra_state` to ``folder/heads.safetensors`` when there are heads (see :meth:`load_heads`)."""
        from vlmkit.fileio import save_tensors

        extra = self.extra_state()
        if extra:
            save_tensors(extra, Path(folder) / HEADS_FILE)

    def load_pretrained(self, folder: str | Path) -> None:
        """Replace the weights with a folder written by :meth:`save_pretrained` (same architecture)."""
        import transformers

        from vlmkit.models.hf_config import load_safetensors

        self.model = load_safetensors(getattr(transformers, self.auto_class), folder, dtype=self.dtype, **self.model_kwargs)
        self.load_heads(folder)

    def load_heads(self, folder: str | Path) -> None:
        """Load ``heads.safetensors`` from ``folder`` when it is there (see :meth:`save_pretrained`)."""
        from vlmkit.fileio import load_tensors

        heads = Path(folder) / HEADS_FILE
        if heads.is_file():
            self.load_extra_state(load_tensors(heads))

    # -- the interface the VLM uses -------------------------------------------------------------
    def count_targets(self, targets: dict[str, torch.Tensor]) -> int:
        """How many targets :meth:`loss` sums over for these targets (``labels`` etc., ``-100`` = none),
        computed without a forward pass. Default: every entry that is not ``-100``."""
        return sum(int((t != IGNORE_INDEX).sum()) for t in targets.values())

    @abc.abstractmethod
    def loss(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Training loss for embedded inputs ``(B, T, H)`` and the batch's targets."""

    @abc.abstractmethod
    def logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """The kind's logits (documented per adapter)."""

    @abc.abstractmethod
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """New token ids ``(B, T_new)`` continuing the embedded prompts (left-padded)."""


def padded_positions(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Positions ``(B, T)`` for a left-padded batch, counting attended tokens only as transformers'
    ``generate`` does, so a left-padded row gets the positions of the same row unpadded (models with
    absolute positions such as GPT-2 depend on it). ``None`` when no row starts with padding: the
    family's own default then applies, bit for bit as in its forward."""
    if attention_mask is None or not bool((attention_mask[:, 0] == 0).any()):
        return None
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class CausalLanguageModel(LanguageModel):
    """Decoder-only adapter around an ``AutoModelForCausalLM``.

    Targets are ``labels`` ``(B, T)`` aligned with the inputs (``-100`` = ignore), shifted inside.
    Forward passes use :func:`padded_positions`, so logits of a left-padded batch equal those
    ``generate`` computes.
    """

    def hidden_states(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Final hidden states ``(B, T, H)`` (after the backbone's final norm), no LM head.

        ``model_kwargs``: the fusion's extra forward arguments (the cross-attention context)."""
        base = self.hf_model.base_model
        if position_ids is None:
            position_ids = padded_positions(attention_mask)
        out = base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   **model_kwargs)
        return out.last_hidden_state

    def logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """Full logits ``(B, T, V)`` through the family's own forward."""
        kwargs.setdefault("position_ids", padded_positions(attention_mask))
        out = self.hf_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out.logits

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states ``(..., H)`` to logits ``(..., V)``; only valid when ``spec.plain_head``."""
        return self.hf_model.get_output_embeddings()(hidden)

    def loss(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, batch: dict[str, torch.Tensor], **model_kwargs: Any
    ) -> LossOutput:
        """Next-token cross-entropy summed over label positions.

        With a plain-head family the LM head runs only on the positions that predict a label, the
        main saving over computing ``(B, T, V)`` logits. ``model_kwargs``: the fusion's extra forward
        arguments.
        """
        labels = batch["labels"]
        targets = labels[:, 1:]
        select = targets != IGNORE_INDEX
        n = int(select.sum())
        if self.spec.plain_head:
            hidden = self.hidden_states(inputs_embeds, attention_mask, **model_kwargs)
            logits = self.head(hidden[:, :-1][select])
        else:
            logits = self.logits(inputs_embeds, attention_mask, **model_kwargs)[:, :-1][select]
        if n == 0:
            return LossOutput(logits.sum() * 0.0, 0)
        return LossOutput(F.cross_entropy(logits.float(), targets[select], reduction="sum"), n)

    def count_targets(self, targets: dict[str, torch.Tensor]) -> int:
        """Labels are aligned with the inputs and shifted inside: the first position predicts nothing."""
        return int((targets["labels"][:, 1:] != IGNORE_INDEX).sum())

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.hf_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
