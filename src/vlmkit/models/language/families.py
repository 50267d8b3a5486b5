"""The language backbone table (registry entries) and the builder.

Adding a family is one :class:`BackboneSpec` here; the adapter is chosen by its ``kind``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers

from vlmkit.models.hf_config import config_class_for, load_safetensors, make_hf_config, override_fields
from vlmkit.models.language.base import (
    BACKBONES,
    BackboneSpec,
    CausalLanguageModel,
    LanguageModel,
    family_for_model_type,
    family_hint,
)
from vlmkit.models.language.encoder import EncoderLanguageModel
from vlmkit.models.language.seq2seq import Seq2SeqLanguageModel
from vlmkit.registry import is_auto

#: adapter class per architecture kind
ADAPTERS: dict[str, type[LanguageModel]] = {
    "decoder": CausalLanguageModel,
    "encoder-decoder": Seq2SeqLanguageModel,
    "encoder": EncoderLanguageModel,
}

def _chinchilla(d_model: int, layers: int, heads: int) -> dict[str, Any]:
    """Chinchilla's shape parameters (Hoffmann et al. 2022) as Llama config fields, 2,048-token
    context. Chinchilla's feed-forward is 4 x d_model wide with two matrices; the Llama layer's gated
    MLP has three, so the same parameter count is 8/3 x d_model, rounded up to a multiple of 256 as
    LLaMA rounds it (11,008 at d_model 4,096). The vocabulary comes from the tokenizer (Chinchilla's
    was a 32k SentencePiece)."""
    gated = -(-(8 * d_model // 3) // 256) * 256
    return {
        "hidden_size": d_model, "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "intermediate_size": gated, "max_position_embeddings": 2048,
    }


for _spec in (
    BackboneSpec(
        name="opt", model_types=("opt",), config_class="OPTConfig", default_template="qa",
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), hidden_size_field="word_embed_proj_dim",
        sizes="125M-66B", used_by="BLIP-2 OPT", example="facebook/opt-2.7b",
        notes="learned positions; OPT-350m projects embeddings (word_embed_proj_dim) to the hidden size",
    ),
    BackboneSpec(
        name="llama", model_types=("llama",), config_class="LlamaConfig", default_template="llama3",
        sizes="1B-70B", used_by="LLaVA, MM1-style models", example="meta-llama/Llama-3.2-1B-Instruct",
    ),
    BackboneSpec(
        name="vicuna", model_types=("llama",), config_class="LlamaConfig", default_template="vicuna_v1",
        sizes="7B-13B", used_by="LLaVA-1.5, InstructBLIP-Vicuna, MiniGPT-4", example="lmsys/vicuna-7b-v1.5",
        notes="LLaMA weights with the vicuna_v1 conversation template",
    ),
    BackboneSpec(
        name="mistral", model_types=("mistral",), config_class="MistralConfig", default_template="chatml",
        sizes="7B", used_by="LLaVA-NeXT-Mistral, Idefics2", example="mistralai/Mistral-7B-Instruct-v0.2",
        notes="sliding-window attention kept from the config (sliding_window)",
    ),
    BackboneSpec(
        name="phi", model_types=("phi",), config_class="PhiConfig", default_template="chatml",
        lora_targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
        sizes="1.3B-2.7B", used_by="LLaVA-Phi, Bunny-Phi, TinyLLaVA", example="microsoft/phi-2",
    ),
    BackboneSpec(
        name="qwen2", model_types=("qwen2",), config_class="Qwen2Config", default_template="chatml",
        sizes="0.5B-72B", used_by="LLaVA-OneVision, Bunny-Qwen", example="Qwen/Qwen2.5-0.5B-Instruct",
    ),
    BackboneSpec(
        name="qwen3", model_types=("qwen3",), config_class="Qwen3Config", default_template="chatml",
        sizes="0.6B-32B", used_by="Qwen3-VL-style models", example="Qwen/Qwen3-0.6B",
    ),
    BackboneSpec(
        name="flan_t5", model_types=("t5",), config_class="T5Config", kind="encoder-decoder", default_template="qa",
        lora_targets=("q", "k", "v", "o", "wi_0", "wi_1", "wo"), hidden_size_field="d_model", plain_head=False,
        sizes="80M-11B", used_by="BLIP-2 FlanT5, InstructBLIP-FlanT5", example="google/flan-t5-xl",
        defaults={"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
        notes="visual tokens + prompt enter the encoder; the decoder writes the answer",
    ),
    BackboneSpec(
        name="roberta", model_types=("roberta",), config_class="RobertaConfig", kind="encoder", default_template="qa",
        lora_targets=("query", "key", "value", "dense"), plain_head=False,
        sizes="125M-355M", used_by="VisualBERT/ViLT-style discriminative VQA and ITM", example="FacebookAI/roberta-base",
        notes="discriminative: VQA as answer classification, image-text matching; no generation",
    ),
    BackboneSpec(
        name="chinchilla", model_types=("llama",), config_class="LlamaConfig", default_template="chatml",
        sizes="70B (44M-16B scaling grid)", used_by="Flamingo", pretrained_weights=False,
        # without a preset: the smallest shape of the paper's grid, never a surprise 70B allocation
        defaults={**_chinchilla(512, 8, 8), "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
        presets={
            "chinchilla-70b": _chinchilla(8192, 80, 64),  # the published Chinchilla: 80 layers, 64 heads of 128
            # Flamingo's frozen LMs (Alayrac et al. 2022, Table 4): Flamingo-3B's 1.4B and Flamingo-9B's 7B
            "chinchilla-1.4b": _chinchilla(2048, 24, 16),
            "chinchilla-7b": _chinchilla(4096, 40, 32),
            "chinchilla-44m": _chinchilla(512, 8, 8),  # smallest model of the scaling grid
            "chinchilla-tiny": _chinchilla(128, 2, 2),  # scaled down by us for CPU experiments and tests
        },
        notes="architecture preset (RMSNorm, Chinchilla shapes; RoPE replaces relative positions); no public weights",
    ),
    BackboneSpec(
        # the fallback: any AutoModelForCausalLM (GPT-2, Gemma, Phi-3, ...); nothing family-specific is assumed
        name="causal_lm", model_types=("*",), config_class="", default_template="tokenizer", lora_targets=(),
        hidden_size_field="hidden_size|n_embd|d_model", plain_head=False,
        sizes="any", used_by="any other AutoModelForCausalLM (GPT-2, Gemma, Phi-3, ...)", example="openai-community/gpt2",
        notes="generic decoder-only: the tokenizer's chat template, LoRA on all linear layers; from scratch needs config.model_type",
    ),
):
    BACKBONES.register(_spec.name, _spec)


def _check_pretrained_source(spec: BackboneSpec, pretrained: str) -> None:
    if not spec.pretrained_weights and not Path(pretrained).is_dir():
        presets = ", ".join(spec.presets)
        raise ValueError(
            f"{spec.name} weights were never published, so model.language.pretrained={pretrained!r} cannot be loaded; "
            f"build it from scratch with model.language.preset (one of {presets}) and train it, or load a folder you saved"
        )


def _config_class(spec: BackboneSpec, config: dict[str, Any]) -> type:
    """The config class to build ``spec`` from scratch: the family's, or the one of
    ``config["model_type"]`` for a generic family."""
    if spec.config_class:
        return getattr(transformers, spec.config_class)
    if "model_type" not in config:
        raise ValueError(
            f"backbone {spec.name!r} builds from scratch from model.language.config.model_type (e.g. gpt2, gemma, phi3); "
            "set it, or load weights with model.language.pretrained"
        )
    return config_class_for(config["model_type"], "model.language.config.model_type")


def _check_family(spec: BackboneSpec, model_type: str, where: str, hf_config: Any = None) -> None:
    """Raise when ``model_type`` (of the checkpoint or config ``where``) is not ``spec``'s; the message
    names the family to use and every family that accepts the model_type."""
    if spec.accepts(model_type, hf_config):
        return
    accepts = "any model_type with an AutoModelForCausalLM class" if spec.generic else ", ".join(spec.model_types)
    try:
        hint = family_hint(model_type, hf_config)
    except ValueError as exc:  # no family at all: say which model types there are
        hint = str(exc)
    raise ValueError(f"{where} has model_type {model_type!r}, not a {spec.name!r} model (accepts {accepts}); {hint}")


def resolve_backbone(backbone: str, pretrained: str | None, config: dict[str, Any], trust_remote_code: bool = False) -> str:
    """The family id to build: ``backbone`` itself, or for ``auto`` the family of the checkpoint's
    ``model_type`` (``model.language.config.model_type`` when building from scratch), preferring
    families with published weights and falling back to the generic ``causal_lm``.

    Raises:
        ValueError: ``auto`` without a model_type to go by, or a model_type no family accepts.
    """
    if not is_auto(backbone):
        return backbone
    if pretrained:
        hf_config = transformers.AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        return family_for_model_type(hf_config.model_type, hf_config)
    if "model_type" in config:
        return family_for_model_type(config["model_type"])
    raise ValueError(
        "model.language.backbone=auto picks the family from a model_type: set model.language.pretrained or "
        "model.language.config.model_type, or name the family (vlmkit list backbones)"
    )


def _from_scratch_fields(
    spec: BackboneSpec, preset: str | None, config: dict[str, Any], special: dict[str, int]
) -> tuple[type, dict[str, Any]]:
    """The config class and the fields to build ``spec`` from scratch (family defaults < preset <
    the tokenizer's special ids < ``config``)."""
    if "model_type" in config:
        _check_family(spec, config["model_type"], "model.language.config", None)
    config_cls = _config_class(spec, config)
    fields = dict(spec.defaults)
    if preset is not None:
        if preset not in spec.presets:
            valid = ", ".join(spec.presets) or "(this family has none)"
            raise ValueError(f"model.language.preset={preset!r} is not a {spec.name} preset; valid: {valid}")
        fields.update(spec.presets[preset])
    # only ids the family's config defines: a fixed default such as OPT's pad_token_id=1 would
    # otherwise zero and freeze the embedding of whatever token has that id in another tokenizer
    defaults = config_cls()
    fields.update({k: v for k, v in special.items() if getattr(defaults, k, None) is not None})
    fields.update({k: v for k, v in config.items() if k != "model_type"})
    return config_cls, fields


def build_language_model(
    backbone: str,
    pretrained: str | None,
    config: dict[str, Any],
    vocab_size: int | None = None,
    dtype: Any = None,
    trust_remote_code: bool = False,
    preset: str | None = None,
    special_tokens: dict[str, int] | None = None,
    answers: list[str] | None = None,
) -> LanguageModel:
    """Build the language model of family ``backbone`` (or ``auto``, see :func:`resolve_backbone`)
    from pretrained weights (safetensors only) or a config.

    Args:
        vocab_size: the tokenizer's length; embeddings are sized (from scratch) or resized
            (pretrained, when the tokenizer gained tokens such as ``<image>``) to it.
        preset: a named shape of the family (from scratch only).
        special_tokens: ``pad_token_id`` / ``eos_token_id`` / ``bos_token_id`` of the tokenizer, set on
            from-scratch configs (and the decoder start token of encoder-decoders).
        answers: the answer vocabulary (encoder-only families).

    Raises:
        RegistryError: unknown ``backbone`` (lists the valid ids).
        ValueError: the checkpoint's (or config's) ``model_type`` belongs to another family (the
            message names every family that accepts it), a family without published weights is asked
            for them, an unknown preset, or a config key unknown to the family's config class.
        FileNotFoundError: the checkpoint has no safetensors weights (only a pickle, say).
    """
    backbone = resolve_backbone(backbone, pretrained, config, trust_remote_code)
    spec = BACKBONES.get(backbone)
    adapter = ADAPTERS[spec.kind]
    auto = getattr(transformers, adapter.auto_class)
    if pretrained:
        _check_pretrained_source(spec, pretrained)
        if preset is not None:
            raise ValueError(f"model.language.preset={preset!r} builds from scratch; it cannot be combined with model.language.pretrained")
        hf_config = transformers.AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        _check_family(spec, hf_config.model_type, pretrained, hf_config)
        override_fields(hf_config, config, "model.language.config")
        model = load_safetensors(
            auto, pretrained, config=hf_config, dtype=dtype, trust_remote_code=trust_remote_code, **adapter.model_kwargs
        )
        resized = vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings
        if resized:  # (on the meta device no values exist to draw the new rows from: resize only)
            model.resize_token_embeddings(vocab_size, mean_resizing=not model.get_input_embeddings().weight.is_meta)
    else:
        resized = False
        config_cls, fields = _from_scratch_fields(spec, preset, config, special_tokens or {})
        if vocab_size is not None:
            fields["vocab_size"] = max(vocab_size, int(fields.get("vocab_size", 0)))
        hf_config = make_hf_config(config_cls, fields, "model.language.config")
        if spec.kind == "encoder-decoder":  # T5's convention: the decoder starts from the pad token
            hf_config.decoder_start_token_id = hf_config.pad_token_id
        model = auto.from_config(hf_config, **adapter.model_kwargs)
        if spec.kind == "encoder-decoder":
            model.generation_config.decoder_start_token_id = hf_config.pad_token_id
        if dtype is not None:
            model = model.to(dtype)
    language = EncoderLanguageModel(model, spec, answers or []) if spec.kind == "encoder" else adapter(model, spec)
    language.embeddings_resized = resized
    if pretrained and Path(pretrained).is_dir():
        language.load_heads(pretrained)
    return language
