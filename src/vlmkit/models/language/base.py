"""Language backbone families and the decoder-only adapter the VLM talks to.

A family is registry data: which Hugging Face ``model_type`` values it accepts, its config class,
its default chat template and LoRA targets. The adapter gives the VLM one narrow interface
(embed ids, run on embeddings, project hidden states to logits, generate) whatever the family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmkit.registry import Registry


@dataclass(frozen=True)
class BackboneSpec:
    """One language backbone family.

    Attributes:
        name: registry id.
        model_types: Hugging Face ``model_type`` values of this family.
        config_class: transformers config class used to build a model from scratch.
        kind: ``decoder`` (decoder-only causal LM).
        default_template: chat template used when the tokenizer has none.
        lora_targets: module names LoRA adapts by default.
        plain_head: logits are exactly ``lm_head(final hidden state)``, so the loss may project only
            the labelled positions (no soft-capping or logit scaling in the family's forward).
        sizes: typical released sizes, for ``vlmkit list backbones``.
        used_by: multimodal models built on this family.
        example: a real checkpoint id.
    """

    name: str
    model_types: tuple[str, ...]
    config_class: str
    kind: str = "decoder"
    default_template: str = "chatml"
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    plain_head: bool = True
    sizes: str = ""
    used_by: str = ""
    example: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


BACKBONES: Registry[BackboneSpec] = Registry("language backbone")


def family_for_model_type(model_type: str) -> str:
    """The registered family id that accepts ``model_type``.

    Raises:
        ValueError: no family accepts it; the message lists the supported model types.
    """
    for name, spec in BACKBONES.items():
        if model_type in spec.model_types:
            return name
    supported = sorted({t for _, s in BACKBONES.items() for t in s.model_types})
    raise ValueError(f"model_type {model_type!r} has no language backbone family; supported: {', '.join(supported)}")


class CausalLanguageModel(nn.Module):
    """Adapter around a Hugging Face causal LM (optionally wrapped by peft).

    Args:
        model: an ``AutoModelForCausalLM`` instance.
        spec: its family.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.model = model
        self.spec = spec

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
        return self.hf_model.get_input_embeddings().embedding_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(B, T) -> (B, T, H)``."""
        return self.hf_model.get_input_embeddings()(input_ids)

    def hidden_states(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states ``(B, T, H)`` (after the backbone's final norm), no LM head."""
        base = self.hf_model.base_model
        out = base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def logits(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full logits ``(B, T, V)`` through the family's own forward."""
        out = self.hf_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.logits

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states ``(..., H)`` to logits ``(..., V)``; only valid when ``spec.plain_head``."""
        return self.hf_model.get_output_embeddings()(hidden)

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """New token ids ``(B, T_new)`` continuing the embedded prompts (left-padded)."""
        return self.hf_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
