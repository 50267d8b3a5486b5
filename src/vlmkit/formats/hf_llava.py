"""``hf-llava``: what transformers' ``LlavaForConditionalGeneration`` / ``AutoModelForImageTextToText``
and ``AutoProcessor`` load (llava-hf/llava-1.5-7b-hf, Bunny and LLaVA-Phi conversions; what vLLM,
SGLang, TGI and ``transformers serve`` read).

The model: ``LlavaConfig`` (vision_config, text_config, image_token_id, vision_feature_layer,
vision_feature_select_strategy, projector_hidden_act, multimodal_projector_bias) and the weights
under transformers' names. The processor: a ``LlavaProcessor`` (image processor, patch_size,
num_additional_image_tokens, the chat template as Jinja). transformers itself reads and writes the
weight files (so its on-disk renames of older checkpoints apply); vlmkit maps module prefixes
(:data:`TABLE`) between the two in-memory layouts.

Expressible: a sequence vision tower that ``AutoModel`` builds from its config (CLIP, SigLIP, ViT,
...) with at most one leading CLS token, the ``mlp2x_gelu`` connector without token merging, prefix
fusion and a decoder-only language model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers

from vlmkit.config import ConnectorConfig, LanguageConfig, ModelConfig, VisionConfig
from vlmkit.fileio import quiet_hf_progress
from vlmkit.formats.base import (
    FORMATS,
    FormatError,
    KeyTable,
    LoadedModel,
    ModelFormat,
    Problem,
    ReadOptions,
    assign_weights,
    build_empty,
    config_fields,
    lora_problems,
)
from vlmkit.formats.hf_common import (
    check_image_token,
    dtype_name,
    exported_chat_template,
    generation_config,
    load_hf_model,
    model_type,
    prompt_settings,
    write_prompt_settings,
)

#: (vlmkit prefix, transformers LLaVA prefix); ``{base}`` is the causal LM's ``base_model_prefix``
TABLE = (
    ("vision.tower.", "model.vision_tower."),
    ("connector.mlp.0.", "model.multi_modal_projector.linear_1."),
    ("connector.mlp.2.", "model.multi_modal_projector.linear_2."),
    ("language.model.lm_head.", "lm_head."),
    ("language.model.{base}.", "model.language_model."),
)


def key_table(base_prefix: str) -> KeyTable:
    return KeyTable(tuple((v.format(base=base_prefix), f) for v, f in TABLE))


def causal_base_prefix(text_config: Any) -> str:
    """``base_model_prefix`` of the causal LM class transformers builds for ``text_config``."""
    cls = transformers.AutoModelForCausalLM._model_mapping[type(text_config)]
    return cls.base_model_prefix


class HFLlavaFormat(ModelFormat):
    name = "hf-llava"
    description = "transformers LlavaForConditionalGeneration + LlavaProcessor (vLLM, SGLang, TGI, transformers serve)"
    looks_for = "config.json with model_type 'llava'"

    def detect(self, folder: Path) -> bool:
        return model_type(folder) == "llava"

    # -- reading ---------------------------------------------------------------------------
    def read(self, folder: Path, options: ReadOptions) -> LoadedModel:
        from vlmkit.models.language import family_for_model_type
        from vlmkit.models.vision.towers import family_for_vision_config
        from vlmkit.processing.hf_image import image_transform_from_hf

        with quiet_hf_progress():
            hf, config = load_hf_model(transformers.LlavaForConditionalGeneration, folder, options.dtype)
            hf_processor = transformers.AutoProcessor.from_pretrained(folder)
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise FormatError(f"{folder}/config.json: vision_feature_layer={layer!r} concatenates several layers; vlmkit selects one")
        if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
            raise FormatError(
                f"{folder}/config.json: projector_hidden_act={config.projector_hidden_act!r}, multimodal_projector_bias="
                f"{config.multimodal_projector_bias}; vlmkit's mlp2x_gelu connector is exact GELU with biases"
            )
        vc, tc = config.vision_config, config.text_config
        encoder = family_for_vision_config(vc)
        strategy = config.vision_feature_select_strategy
        tokenizer = hf_processor.tokenizer
        check_image_token(folder, hf_processor, config.image_token_id)
        transform = image_transform_from_hf(hf_processor.image_processor.to_dict())
        prompt = prompt_settings(folder, getattr(hf_processor, "chat_template", None), tokenizer,
                                 getattr(tc, "max_position_embeddings", 2048) or 2048)
        cfg = ModelConfig(
            vision=VisionConfig(
                encoder=encoder, config={"model_type": vc.model_type, **config_fields(vc)} if encoder == "automodel" else config_fields(vc),
                feature_layer=layer, drop_cls=strategy == "default", image_size=transform.size,
                image_mean=list(transform.mean), image_std=list(transform.std), image_aspect=transform.aspect,
            ),
            connector=ConnectorConfig(type="mlp2x_gelu"),
            language=LanguageConfig(backbone=family_for_model_type(tc.model_type, tc), config=config_fields(tc)),
            template=prompt["template"], system_prompt=prompt["system_prompt"], max_length=prompt["max_length"],
            dtype=options.dtype or dtype_name(hf),
        )
        model, processor = build_empty(cfg, tokenizer)
        if strategy == "default" and not model.vision.drop_cls:
            raise FormatError(f"{folder}/config.json: vision_feature_select_strategy 'default' drops a CLS token, but a "
                              f"{encoder} tower has none; use 'full'")
        if model.vision.spec.num_prefix_tokens > 1 and strategy == "default":
            raise FormatError(f"{folder}: the {encoder} tower has {model.vision.spec.num_prefix_tokens} leading tokens; "
                              "LLaVA's 'default' selection drops only one")
        state = key_table(causal_base_prefix(tc)).from_format(hf.state_dict(), str(folder))
        del hf
        assign_weights(model, state, str(folder))
        return LoadedModel(model, processor, cfg, self.name)

    # -- writing ---------------------------------------------------------------------------
    def unsupported(self, model: Any, processor: Any, config: ModelConfig) -> list[Problem]:
        from vlmkit.models.connectors.projectors import MLPConnector

        problems = []
        vision = model.vision
        tower_cls = transformers.AutoModel._model_mapping.get(type(vision.tower.config), None) if vision.spec.layout == "sequence" else None
        if vision.spec.layout != "sequence":
            problems.append(Problem("vision", f"the {vision.spec.name} tower returns feature maps; hf-llava holds sequence "
                                              "towers (clip, siglip, vit)"))
        elif tower_cls is not type(vision.tower):
            problems.append(Problem("vision", f"{type(vision.tower).__name__} is not what AutoModel builds for its config"))
        elif vision.drop_cls and vision.spec.num_prefix_tokens > 1:
            problems.append(Problem("vision", f"dropping {vision.spec.num_prefix_tokens} leading tokens; LLaVA drops one"))
        connector = model.connector
        if not (isinstance(connector, MLPConnector) and len(connector.mlp) == 3 and connector.merge.factor == 1):
            what = config.connector.type + (f" with merge={connector.merge.factor}" if hasattr(connector, "merge") and connector.merge.factor > 1 else "")
            problems.append(Problem("connector", f"{what}: LLaVA's projector is exactly mlp2x_gelu without token merging"))
        if model.fusion.state_dict() or type(model.fusion).__name__ != "PrefixFusion":
            problems.append(Problem("fusion", f"{config.fusion.type} fusion: LLaVA splices visual tokens into the sequence (prefix)"))
        language = model.language
        if language.spec.kind != "decoder":
            problems.append(Problem("language", f"the {language.spec.name} backbone is {language.spec.kind}; LLaVA needs a decoder-only LM"))
        elif type(language.config) not in transformers.AutoModel._model_mapping or not hasattr(language.hf_model, "lm_head"):
            problems.append(Problem("language", f"{type(language.hf_model).__name__} has no AutoModel base or lm_head"))
        elif getattr(language.hf_model.lm_head, "bias", None) is not None:
            problems.append(Problem("language", f"the {language.spec.name} LM head has a bias (Phi's does); "
                                                "LlavaForConditionalGeneration's lm_head has none"))
        if getattr(processor.template, "images_first", False):
            problems.append(Problem("processor", f"template {processor.template.name!r} puts images before the BOS token; "
                                                 "a LLaVA chat template cannot"))
        return problems + lora_problems(model)

    def write(self, model: Any, processor: Any, config: ModelConfig, folder: Path) -> None:
        from accelerate import init_empty_weights

        from vlmkit.processing.hf_image import hf_image_processor

        vision, language = model.vision, model.language
        vc, tc = vision.tower.config, language.config
        strategy = "default" if vision.drop_cls else "full"
        llava_config = transformers.LlavaConfig(
            vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_id=processor.image_token_id,
            vision_feature_layer=vision.feature_layer, vision_feature_select_strategy=strategy,
            projector_hidden_act="gelu", multimodal_projector_bias=True, image_seq_length=model.num_image_tokens,
            tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        )
        with init_empty_weights(include_buffers=False):
            hf = transformers.LlavaForConditionalGeneration(llava_config)
        state = key_table(causal_base_prefix(tc)).to_format(model.state_dict(), "the model")
        hf.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True, assign=True)
        if llava_config.tie_word_embeddings:
            hf.tie_weights()
        hf.generation_config = generation_config(processor)
        patch = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
        hf_processor = transformers.LlavaProcessor(
            image_processor=hf_image_processor(processor.image_transform), tokenizer=processor.tokenizer, patch_size=patch,
            vision_feature_select_strategy=strategy, num_additional_image_tokens=vision.spec.num_prefix_tokens,
            chat_template=exported_chat_template(processor),
        )
        with quiet_hf_progress():
            hf.save_pretrained(folder)
            hf_processor.save_pretrained(folder)
        write_prompt_settings(folder, processor)


FORMATS.register(HFLlavaFormat.name, HFLlavaFormat())
