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

from vlmkit.registry import Registry

IGNORE_INDEX = -100
KINDS = ("decoder", "encoder-decoder", "encoder")
HEADS_FILE = "heads.safetensors"  # task heads saved beside a transformers model folder


@dataclass(frozen=True)
class BackboneSpec:
    """One language backbone family.

    Attributes:
        name: registry id.
        model_types: Hugging Face ``model_type`` values of this family.
        config_class: transformers config class used to build a model from scratch.
        kind: ``decoder`` (causal LM), ``encoder-decoder`` (seq2seq LM) or ``encoder`` (bidirectional
            encoder; discriminative tasks only).
        default_template: chat template used when the tokenizer has none.
        lora_targets: module names LoRA adapts by default.
        hidden_size_field: config attribute holding the width of the token embeddings (the width
            the connector must produce): ``hidden_size``, T5's ``d_model``, OPT's ``word_embed_proj_dim``.
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


BACKBONES: Registry[BackboneSpec] = Registry("language backbone")


def family_for_model_type(model_type: str) -> str:
    """The first registered family id that accepts ``model_type``.

    Raises:
        ValueError: no family accepts it; the message lists the supported model types.
    """
    for name, spec in BACKBONES.items():
        if model_type in spec.model_types:
            return name
    supported = sorted({t for _, s in BACKBONES.items() for t in s.model_types})
    raise ValueError(f"model_type {model_type!r} has no language backbone family; supported: {', '.join(supported)}")


class NotGenerativeError(ValueError):
    """The backbone cannot generate text (encoder-only); the message says what it can do instead."""


@dataclass
class LossOutput:
    """A mean loss and the number of targets (tokens or rows) it averages over; ``logits`` when cheap."""

    loss: torch.Tensor
    count: int


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
        return int(getattr(self.config, self.spec.hidden_size_field))

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

        self.model = getattr(transformers, self.auto_class).from_pretrained(folder, dtype=self.dtype, **self.model_kwargs)
        self.load_heads(folder)

    def load_heads(self, folder: str | Path) -> None:
        """Load ``heads.safetensors`` from ``folder`` when it is there (see :meth:`save_pretrained`)."""
        from vlmkit.fileio import load_tensors

        heads = Path(folder) / HEADS_FILE
        if heads.is_file():
            self.load_extra_state(load_tensors(heads))

    # -- the interface the VLM uses -------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Training loss for embedded inputs ``(B, T, H)`` and the batch's targets."""

    @abc.abstractmethod
    def logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """The kind's logits (documented per adapter)."""

    @abc.abstractmethod
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """New token ids ``(B, T_new)`` continuing the embedded prompts (left-padded)."""


class CausalLanguageModel(LanguageModel):
    """Decoder-only adapter around an ``AutoModelForCausalLM``.

    Targets are ``labels`` ``(B, T)`` aligned with the inputs (``-100`` = ignore), shifted inside.
    """

    def hidden_states(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states ``(B, T, H)`` (after the backbone's final norm), no LM head."""
        base = self.hf_model.base_model
        out = base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """Full logits ``(B, T, V)`` through the family's own forward."""
        out = self.hf_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out.logits

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states ``(..., H)`` to logits ``(..., V)``; only valid when ``spec.plain_head``."""
        return self.hf_model.get_output_embeddings()(hidden)

    def loss(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Next-token cross-entropy over label positions.

        With a plain-head family the LM head runs only on the positions that predict a label, the
        main saving over computing ``(B, T, V)`` logits.
        """
        labels = batch["labels"]
        targets = labels[:, 1:]
        select = targets != IGNORE_INDEX
        n = int(select.sum())
        if self.spec.plain_head:
            hidden = self.hidden_states(inputs_embeds, attention_mask)
            logits = self.head(hidden[:, :-1][select])
        else:
            logits = self.logits(inputs_embeds, attention_mask)[:, :-1][select]
        if n == 0:
            return LossOutput(logits.sum() * 0.0, 0)
        return LossOutput(F.cross_entropy(logits.float(), targets[select]), n)

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.hf_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
