"""Registry entries for decoder-only language backbone families and the builder."""

from __future__ import annotations

from typing import Any

import transformers

from vlmkit.models.hf_config import make_hf_config, override_fields
from vlmkit.models.language.base import BACKBONES, BackboneSpec, CausalLanguageModel, family_for_model_type

for _spec in (
    BackboneSpec(
        name="llama", model_types=("llama",), config_class="LlamaConfig", default_template="llama3",
        sizes="1B-70B", used_by="LLaVA, LLaVA-1.5 (via Vicuna), MM1-style models", example="meta-llama/Llama-3.2-1B-Instruct",
    ),
    BackboneSpec(
        name="qwen2", model_types=("qwen2",), config_class="Qwen2Config", default_template="chatml",
        sizes="0.5B-72B", used_by="LLaVA-OneVision, Bunny-Qwen", example="Qwen/Qwen2.5-0.5B-Instruct",
    ),
    BackboneSpec(
        name="phi", model_types=("phi",), config_class="PhiConfig", default_template="chatml",
        lora_targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
        sizes="1.3B-2.7B", used_by="LLaVA-Phi, Bunny-Phi, TinyLLaVA", example="microsoft/phi-2",
    ),
    BackboneSpec(
        name="mistral", model_types=("mistral",), config_class="MistralConfig", default_template="chatml",
        sizes="7B", used_by="LLaVA-NeXT-Mistral, Idefics2", example="mistralai/Mistral-7B-Instruct-v0.2",
    ),
):
    BACKBONES.register(_spec.name, _spec)


def build_language_model(
    backbone: str,
    pretrained: str | None,
    config: dict[str, Any],
    vocab_size: int | None = None,
    dtype: Any = None,
    trust_remote_code: bool = False,
) -> CausalLanguageModel:
    """Build the language model of family ``backbone`` from pretrained weights or a config.

    Args:
        vocab_size: the tokenizer's length; embeddings are sized (from scratch) or resized
            (pretrained, when the tokenizer gained tokens such as ``<image>``) to it.

    Raises:
        RegistryError: unknown ``backbone`` (lists the valid ids).
        ValueError: the pretrained checkpoint's ``model_type`` belongs to another family, or a config
            key is unknown to the family's config class.
    """
    spec = BACKBONES.get(backbone)
    if pretrained:
        hf_config = transformers.AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        if hf_config.model_type not in spec.model_types:
            raise ValueError(
                f"{pretrained} has model_type {hf_config.model_type!r}, not a {backbone!r} model "
                f"(accepts {', '.join(spec.model_types)}); use model.language.backbone={family_for_model_type(hf_config.model_type)}"
            )
        override_fields(hf_config, config, "model.language.config")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            pretrained, config=hf_config, dtype=dtype, trust_remote_code=trust_remote_code
        )
        if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)
    else:
        fields = {**spec.defaults, **config}
        if vocab_size is not None:
            fields["vocab_size"] = max(vocab_size, int(fields.get("vocab_size", 0)))
        hf_config = make_hf_config(spec.config_class, fields, "model.language.config")
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
        if dtype is not None:
            model = model.to(dtype)
    return CausalLanguageModel(model, spec)
