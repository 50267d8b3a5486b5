"""A recipe's tiny twin: the recipe with every dimension made small, so a CPU trains all its stages
in seconds (``vlmkit train RECIPE --tiny-twin``, and the tests of every shipped recipe).

What the twin keeps from the recipe: the vision tower family, its feature layer and CLS choice, the
connector type and its options (sizes scaled down), the fusion type, the language backbone family,
the chat template, every stage with its trainability policy (LoRA included), learning-rate scales,
weight decay and clipping, gradient checkpointing and the export formats. What it replaces: pretrained
weights by random ones built from the tiny configs below, the tokenizer by a byte-level BPE trained on
the twin's text, the data by easy-VQA (captions for caption stages, questions otherwise), and the
schedule by a few steps at a CPU-sized learning rate. A twin trains the architecture the recipe
builds; it says nothing about the recipe's accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmkit.config import ConfigError, RecipeConfig, from_dict, to_dict

#: a small config per language backbone family: hidden size 32, 2 layers
TINY_LANGUAGE: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256},
    "qwen2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256},
    "phi": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 256},
    "mistral": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 256, "sliding_window": 16},
    "opt": {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 32,
            "max_position_embeddings": 256},
    "vicuna": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 256},
    "qwen3": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256},
    "flan_t5": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
    "roberta": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 600, "type_vocab_size": 1},
    "chinchilla": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "max_position_embeddings": 256},
}

#: a small config per vision tower family (32-px images)
TINY_VISION: dict[str, dict[str, Any]] = {
    "clip": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "siglip": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "vit": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "blip2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"},
    "convnext": {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2},
    "bit": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "num_groups": 4, "layer_type": "bottleneck"},
}

#: connector options that set sizes, scaled down (the recipe's other options are kept)
TINY_CONNECTOR_OPTIONS: dict[str, dict[str, Any]] = {
    "qformer": {"num_queries": 4, "num_layers": 1, "num_heads": 2, "hidden_size": None, "intermediate_size": None},
    "resampler": {"num_latents": 4, "depth": 1, "num_heads": 2, "head_dim": 8, "hidden_size": None},
    "c_abstractor": {"num_queries": 4, "depth": 1, "hidden_size": None},
}
#: connector options that point at files the twin does not use
DROPPED_CONNECTOR_OPTIONS = ("init_from",)
TINY_IMAGE_SIZE = 32
TINY_LAYERS = 2


def tiny_twin(recipe: RecipeConfig, output_dir: str | Path, steps: int = 6, rows: int = 64, batch_size: int = 8,
              lr: float = 3e-3) -> RecipeConfig:
    """The tiny twin of ``recipe`` (see the module docstring), training ``steps`` optimizer steps of
    ``batch_size`` per stage on the first ``rows`` easy-VQA training rows, into ``output_dir``.

    Raises:
        ConfigError: the recipe's tower or backbone family is ``auto`` / generic (a twin needs the
            family by name), or a family has no tiny config here.
    """
    data = to_dict(recipe)
    data["name"] = f"{recipe.name}-twin"
    data["description"] = f"tiny twin of {recipe.name}: its architecture kinds and stage policies, small and random, on easy-VQA"
    data["model"] = _tiny_model(recipe)
    data["stages"] = [_tiny_stage(stage, steps, rows, batch_size, lr) for stage in data["stages"]]
    train = data["train"]
    train.update(output_dir=str(output_dir), precision="fp32", strategy="none", save_every=0, keep_checkpoints=1,
                 progress=False, threads=None, log_every=1)
    data["eval"] = None
    return from_dict(RecipeConfig, data)


def _family(where: str, name: str, table: dict[str, Any]) -> str:
    if name not in table:
        raise ConfigError(f"{where}={name!r}: a tiny twin needs a family with a tiny config; families that have one: "
                          f"{', '.join(sorted(table))} (name the family instead of auto / a generic one)")
    return name


def _tiny_model(recipe: RecipeConfig) -> dict[str, Any]:
    from vlmkit.models.language import BACKBONES

    model = to_dict(recipe.model)
    vision = model["vision"]
    encoder = _family("model.vision.encoder", vision["encoder"], TINY_VISION)
    vision.update(pretrained=None, config=dict(TINY_VISION[encoder]), image_size=TINY_IMAGE_SIZE)
    if vision["feature_layer"] < -TINY_LAYERS:
        vision["feature_layer"] = -TINY_LAYERS
    connector = model["connector"]
    options = {k: v for k, v in connector["options"].items() if k not in DROPPED_CONNECTOR_OPTIONS}
    options.update(TINY_CONNECTOR_OPTIONS.get(connector["type"], {}))
    connector.update(options={k: v for k, v in options.items() if v is not None}, pretrained=None)
    language = model["language"]
    backbone = _family("model.language.backbone", language["backbone"], TINY_LANGUAGE)
    language.update(pretrained=None, preset=None, config=dict(TINY_LANGUAGE[backbone]),
                    tokenizer={"path": None, "train_vocab_size": 400})
    fusion = model["fusion"]
    if "every" in fusion["options"]:
        fusion["options"]["every"] = min(int(fusion["options"]["every"]), TINY_LAYERS)
    fusion["options"].pop("heads", None)
    fusion["pretrained"] = None
    if model["template"] in ("auto", "tokenizer"):  # a trained BPE has no chat template of its own
        default = BACKBONES.get(backbone).default_template
        model["template"] = "chatml" if default == "tokenizer" else default
    model.update(pretrained=None, dtype="float32", max_length=160, answers=[], trust_remote_code=False, allow_pickle=False)
    return model


def _tiny_stage(stage: dict[str, Any], steps: int, rows: int, batch_size: int, lr: float) -> dict[str, Any]:
    captions = stage["data"].get("template") == "plain" or stage["data"].get("kind") == "captions"
    data = {"source": "easyvqa", "split": "train", "kind": "captions" if captions else "qa", "limit": rows,
            "cache_images": True, "template": "plain" if captions else stage["data"].get("template")}
    lora = {**stage["lora"], "r": 4, "alpha": 8, "dropout": 0.0}
    return {**stage, "data": data, "lora": lora, "max_steps": steps, "epochs": 1.0, "batch_size": batch_size,
            "micro_batch_size": None, "lr": lr, "warmup_ratio": 0.0}
