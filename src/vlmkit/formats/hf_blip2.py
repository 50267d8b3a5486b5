"""``hf-blip2``: what transformers' ``Blip2ForConditionalGeneration`` and ``Blip2Processor`` load
(Salesforce/blip2-opt-2.7b, blip2-flan-t5-xl), with OPT or Flan-T5.

vlmkit's counterpart: the ``blip2`` vision tower (features = its last hidden state, CLS kept), the
``qformer`` connector (transformers' ``Blip2QFormerModel`` with the learned query tokens, its input
layer norm and the language projection) and an OPT or Flan-T5 language model. BLIP-2's vision
post-layernorm is the Q-Former's input norm (``connector.vision_norm``); the tower's own copy is
never used for the features, so it is filled from the same tensor on reading and not written.

BLIP-2 puts the query tokens before everything else, the BOS included; vlmkit's ``blip2`` template
renders prompts that way (``Question: ... Answer:``).
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
    generation_config,
    load_hf_model,
    model_type,
    prompt_settings,
    write_prompt_settings,
)

TABLE = KeyTable(
    rows=(
        ("connector.vision_norm.", "vision_model.post_layernorm."),
        ("vision.tower.", "vision_model."),
        ("connector.query_tokens", "query_tokens"),
        ("connector.qformer.", "qformer."),
        ("connector.proj.", "language_projection."),
        ("language.model.", "language_model."),
    ),
    aliases=(("vision.tower.post_layernorm.", "vision_model.post_layernorm."),),
)
LANGUAGE_FAMILIES = {"opt": "opt", "t5": "flan_t5"}


class HFBlip2Format(ModelFormat):
    name = "hf-blip2"
    description = "transformers Blip2ForConditionalGeneration (OPT or Flan-T5) + Blip2Processor"
    looks_for = "config.json with model_type 'blip-2'"

    def detect(self, folder: Path) -> bool:
        return model_type(folder) == "blip-2"

    def read(self, folder: Path, options: ReadOptions) -> LoadedModel:
        from vlmkit.processing.hf_image import image_transform_from_hf

        with quiet_hf_progress():
            hf, config = load_hf_model(transformers.Blip2ForConditionalGeneration, folder, options.dtype)
            hf_processor = transformers.AutoProcessor.from_pretrained(folder)
        vc, qc, tc = config.vision_config, config.qformer_config, config.text_config
        if tc.model_type not in LANGUAGE_FAMILIES:
            raise FormatError(f"{folder}/config.json: text_config.model_type {tc.model_type!r}; vlmkit reads BLIP-2 with OPT or Flan-T5")
        tokenizer = hf_processor.tokenizer
        check_image_token(folder, hf_processor, config.image_token_id)
        transform = image_transform_from_hf(hf_processor.image_processor.to_dict())
        max_len = getattr(tc, "max_position_embeddings", None) or getattr(tc, "n_positions", None) or 512
        prompt = prompt_settings(folder, getattr(hf_processor, "chat_template", None), tokenizer, max_len, fallback="blip2")
        cfg = ModelConfig(
            vision=VisionConfig(encoder="blip2", config=config_fields(vc), feature_layer=-1, drop_cls=False, image_size=transform.size,
                                image_mean=list(transform.mean), image_std=list(transform.std), image_aspect=transform.aspect),
            connector=ConnectorConfig(type="qformer", options={
                "num_queries": config.num_query_tokens, "num_layers": qc.num_hidden_layers, "num_heads": qc.num_attention_heads,
                "hidden_size": qc.hidden_size, "intermediate_size": qc.intermediate_size, "layer_norm_eps": qc.layer_norm_eps,
                "hidden_act": qc.hidden_act, "cross_attention_frequency": qc.cross_attention_frequency,
                "vision_norm_eps": vc.layer_norm_eps,
            }),
            language=LanguageConfig(backbone=LANGUAGE_FAMILIES[tc.model_type], config=config_fields(tc)),
            template=prompt["template"], system_prompt=prompt["system_prompt"], max_length=prompt["max_length"],
            dtype=options.dtype or dtype_name(hf),
        )
        model, processor = build_empty(cfg, tokenizer)
        state = TABLE.from_format(hf.state_dict(), str(folder))
        del hf
        assign_weights(model, state, str(folder))
        return LoadedModel(model, processor, cfg, self.name)

    def unsupported(self, model: Any, processor: Any, config: ModelConfig) -> list[Problem]:
        from vlmkit.models.connectors.qformer import QFormerConnector

        problems = []
        vision = model.vision
        if vision.spec.name != "blip2":
            problems.append(Problem("vision", f"a {vision.spec.name} tower; BLIP-2 holds its own EVA-style ViT (encoder: blip2)"))
        elif vision.feature_layer != -1 or vision.drop_cls:
            problems.append(Problem("vision", f"feature_layer={vision.feature_layer}, drop_cls={vision.drop_cls}; BLIP-2 reads "
                                              "the last layer with its CLS token (feature_layer -1, drop_cls false)"))
        if not isinstance(model.connector, QFormerConnector):
            problems.append(Problem("connector", f"{config.connector.type}: BLIP-2's connector is the qformer"))
        if model.fusion.state_dict():
            problems.append(Problem("fusion", f"{config.fusion.type} fusion: BLIP-2 puts the queries into the sequence (prefix)"))
        if model.language.config.model_type not in LANGUAGE_FAMILIES:
            problems.append(Problem("language", f"a {model.language.config.model_type} LM; hf-blip2 holds OPT and Flan-T5"))
        return problems + lora_problems(model)

    def write(self, model: Any, processor: Any, config: ModelConfig, folder: Path) -> None:
        from accelerate import init_empty_weights

        from vlmkit.processing.hf_image import hf_image_processor

        connector, language = model.connector, model.language
        qc = connector.qformer_config().to_dict()
        blip2_config = transformers.Blip2Config(
            vision_config=model.vision.tower.config.to_dict(), qformer_config=qc, text_config=language.config.to_dict(),
            num_query_tokens=connector.num_output_tokens, image_token_index=processor.image_token_id,
        )
        with init_empty_weights(include_buffers=False):
            hf = transformers.Blip2ForConditionalGeneration(blip2_config)
        state = TABLE.to_format(model.state_dict(), "the model")
        hf.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True, assign=True)
        hf.tie_weights()
        hf.generation_config = generation_config(processor)
        hf_processor = transformers.Blip2Processor(image_processor=hf_image_processor(processor.image_transform),
                                                   tokenizer=processor.tokenizer, num_query_tokens=connector.num_output_tokens)
        with quiet_hf_progress():
            hf.save_pretrained(folder)
            hf_processor.save_pretrained(folder)
        write_prompt_settings(folder, processor)


FORMATS.register(HFBlip2Format.name, HFBlip2Format())
