"""``llava-original``: the haotian-liu/LLaVA layout (liuhaotian/llava-v1.5-7b, LLaVA-1.0, stage-1 runs).

A folder holds the language model's config.json with the multimodal keys beside it
(``mm_vision_tower``, ``mm_projector_type``, ``mm_hidden_size``, ``mm_vision_select_layer``,
``mm_vision_select_feature``, ``image_aspect_ratio``, ``mm_use_im_start_end``), the tokenizer and
weights: the LM's own names plus ``model.mm_projector.*`` and, when the tower was trained or saved
with the model, ``model.vision_tower.vision_tower.vision_model.*``; otherwise the tower is loaded
from ``mm_vision_tower`` (a hub id or a folder). A stage-1 run leaves only ``mm_projector.bin``;
that is a connector, read by :func:`read_projector` (``model.connector.pretrained``).

These checkpoints usually ship as pickles (``pytorch_model*.bin``). They are read only with the
user's opt-in and only through ``torch.load(weights_only=True)``.

Prompts are LLaVA-1.5's ``vicuna_v1`` conversation, and LLaVA's ``<image>`` placeholder (id -200 in
its code) becomes a real ``<image>`` token added to the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

from vlmkit.config import ConnectorConfig, LanguageConfig, ModelConfig, VisionConfig
from vlmkit.fileio import quiet_hf_progress, save_tensors
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
    read_json,
    read_tensors,
)
from vlmkit.formats.hf_common import DTYPE_NAMES

#: LLaVA's projector names per vlmkit connector type (``mm_projector_type``)
PROJECTORS: dict[str, tuple[tuple[str, str], ...]] = {
    "linear": (("connector.proj.", "model.mm_projector."),),
    "mlp2x_gelu": (("connector.mlp.0.", "model.mm_projector.0."), ("connector.mlp.2.", "model.mm_projector.2.")),
    "mlp3x_gelu": (("connector.mlp.0.", "model.mm_projector.0."), ("connector.mlp.2.", "model.mm_projector.2."),
                   ("connector.mlp.4.", "model.mm_projector.4.")),
}
TOWER = ("vision.tower.", "model.vision_tower.vision_tower.vision_model.")
#: model_type of the LLaVA config -> the language model's model_type
LANGUAGE_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_mpt": "mpt"}
SELECT_FEATURE = {"patch": True, "cls_patch": False}
ASPECTS = {"pad": "pad", "square": "crop", None: "crop"}
MM_KEYS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
           "image_aspect_ratio", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_patch_merge_type", "tune_mm_mlp_adapter",
           "freeze_mm_mlp_adapter", "mm_projector_lr", "image_grid_pinpoints", "tokenizer_padding_side",
           "tokenizer_model_max_length", "mm_vision_tower_lr", "use_mm_proj")
PROJECTOR_FILES = ("mm_projector.bin", "mm_projector.safetensors")


def key_table(projector: str) -> KeyTable:
    return KeyTable((*PROJECTORS[projector], TOWER, ("language.model.lm_head.", "lm_head."), ("language.model.model.", "model.")))


def weight_files(folder: Path) -> list[Path]:
    """The folder's weights: safetensors when there are any, else pickles (``pytorch_model*.bin``).

    Raises:
        FormatError: no weights, or a shard the index names is missing.
    """
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set((read_json(index).get("weight_map") or {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FormatError(f"{folder}: shard(s) {', '.join(missing)} listed in {index_name} are missing")
            return [folder / s for s in shards]
        files = sorted(p for p in folder.glob(pattern) if p.name not in PROJECTOR_FILES)
        if files:
            return files
    raise FormatError(f"{folder} has no weights (model*.safetensors or pytorch_model*.bin)")


def is_projector_file(path: Path) -> bool:
    """Whether ``path`` is a LLaVA stage-1 projector file (by name, or a ``.bin``)."""
    return path.name in PROJECTOR_FILES or path.suffix in (".bin", ".pt", ".pth")


def read_projector(path: str | Path, connector_type: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A stage-1 ``mm_projector.bin`` (or ``.safetensors``) as the state of a vlmkit connector.

    Raises:
        FormatError: a pickle without the opt-in, an unsupported connector type, or tensors that are
            not LLaVA projector weights (names them).
    """
    path = Path(path)
    if connector_type not in PROJECTORS:
        raise FormatError(f"{path}: an original LLaVA projector fits connector types {', '.join(PROJECTORS)}, not {connector_type!r}")
    state = read_tensors([path], allow_pickle)
    # the projector alone is saved under "model.mm_projector." (or without "model." by some forks)
    state = {("model." + k if k.startswith("mm_projector.") else k): v for k, v in state.items()}
    table = KeyTable(PROJECTORS[connector_type])
    return {k[len("connector."):]: v for k, v in table.from_format(state, str(path)).items()}


class LlavaOriginalFormat(ModelFormat):
    name = "llava-original"
    description = "haotian-liu/LLaVA checkpoints: LM weights + model.mm_projector.* (+ model.vision_tower.*), mm_* config keys"
    looks_for = "config.json with mm_vision_tower / mm_projector_type keys"

    def detect(self, folder: Path) -> bool:
        path = folder / "config.json"
        if not path.is_file():
            return False
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(data, dict) and ("mm_vision_tower" in data or "mm_projector_type" in data)

    def read(self, folder: Path, options: ReadOptions) -> LoadedModel:
        from vlmkit.models.language import family_for_model_type
        from vlmkit.models.vision.towers import build_vision_encoder, family_for_vision_config
        from vlmkit.processing.tokenizer import load_tokenizer

        config_path = folder / "config.json"
        raw = read_json(config_path)
        projector = raw.get("mm_projector_type", "linear")
        if projector not in PROJECTORS:
            raise FormatError(f"{config_path}: mm_projector_type={projector!r}; vlmkit reads {', '.join(PROJECTORS)}")
        if raw.get("mm_use_im_start_end"):
            raise FormatError(f"{config_path}: mm_use_im_start_end=true (<im_start>/<im_end> around each image) is not supported")
        feature = raw.get("mm_vision_select_feature", "patch")
        if feature not in SELECT_FEATURE:
            raise FormatError(f"{config_path}: mm_vision_select_feature={feature!r}; valid: {', '.join(SELECT_FEATURE)}")
        aspect = raw.get("image_aspect_ratio")
        if aspect not in ASPECTS:
            raise FormatError(f"{config_path}: image_aspect_ratio={aspect!r} is not supported (valid: pad, square)")
        if not raw.get("mm_vision_tower"):
            raise FormatError(f"{config_path} has no mm_vision_tower (the CLIP tower the projector was trained on)")
        lm_type = LANGUAGE_TYPES.get(raw.get("model_type", "llava"), raw.get("model_type"))
        lm_class = transformers.CONFIG_MAPPING[lm_type] if lm_type in transformers.CONFIG_MAPPING else None
        if lm_class is None:
            raise FormatError(f"{config_path}: model_type {raw.get('model_type')!r} names no language model vlmkit knows")
        lm_fields = {k: v for k, v in raw.items() if k not in MM_KEYS}
        text_config = lm_class(**config_fields(lm_class(**{k: v for k, v in lm_fields.items() if k in lm_class().to_dict()})))

        state = read_tensors(weight_files(folder), options.allow_pickle)
        tower_in_checkpoint = any(k.startswith(TOWER[1]) for k in state)
        tower_source = raw["mm_vision_tower"]
        if (folder / tower_source).is_dir():  # a tower saved beside the checkpoint (as vlmkit writes it)
            tower_source = str(folder / tower_source)
        with quiet_hf_progress():
            tower_config = transformers.AutoConfig.from_pretrained(tower_source)
            tower_config = getattr(tower_config, "vision_config", tower_config)
            # the tower's preprocessor gives the normalisation; its weights only when the checkpoint lacks them
            reference = build_vision_encoder("auto", tower_source, {}, raw.get("mm_vision_select_layer", -2),
                                             SELECT_FEATURE[feature], None, None, None) if not tower_in_checkpoint else None
        from vlmkit.models.vision.towers import read_preprocessor, crop_size

        pre = read_preprocessor(tower_source)
        size = crop_size(pre) or tower_config.image_size
        encoder = family_for_vision_config(tower_config)
        cfg = ModelConfig(
            vision=VisionConfig(
                encoder=encoder, config=config_fields(tower_config), feature_layer=raw.get("mm_vision_select_layer", -2),
                drop_cls=SELECT_FEATURE[feature], image_size=size,
                image_mean=list(pre.get("image_mean") or (reference.image_mean if reference else (0.48145466, 0.4578275, 0.40821073))),
                image_std=list(pre.get("image_std") or (reference.image_std if reference else (0.26862954, 0.26130258, 0.27577711))),
                image_aspect=ASPECTS[aspect],
            ),
            connector=ConnectorConfig(type=projector),
            language=LanguageConfig(backbone=family_for_model_type(lm_type, text_config), config=config_fields(text_config)),
            template="vicuna_v1", max_length=int(raw.get("tokenizer_model_max_length") or getattr(text_config, "max_position_embeddings", 2048)),
            dtype=options.dtype or DTYPE_NAMES.get(next(iter(state.values())).dtype, "float32"),
        )
        if cfg.language.backbone == "llama":
            cfg.language.backbone = "vicuna"  # LLaVA-1.5's LM and conversation
        with quiet_hf_progress():
            tokenizer = load_tokenizer(str(folder))
        model, processor = build_empty(cfg, tokenizer)
        renamed = key_table(projector).from_format(state, str(folder))
        if reference is not None:
            renamed.update({"vision.tower." + k: v for k, v in reference.tower.state_dict().items()})
        _fit_embeddings(model, renamed, str(folder))
        assign_weights(model, renamed, str(folder))
        return LoadedModel(model, processor, cfg, self.name)

    def unsupported(self, model: Any, processor: Any, config: ModelConfig) -> list[Problem]:
        problems = []
        if model.vision.spec.name not in ("clip", "siglip"):
            problems.append(Problem("vision", f"a {model.vision.spec.name} tower; LLaVA's code loads CLIP (or SigLIP) towers"))
        kind = config.connector.type
        merge = getattr(getattr(model.connector, "merge", None), "factor", 1)
        if kind not in PROJECTORS or merge != 1:
            problems.append(Problem("connector", f"{kind}{f' with merge={merge}' if merge != 1 else ''}: LLaVA's projectors are "
                                                 f"{', '.join(PROJECTORS)} without token merging"))
        if model.fusion.state_dict():
            problems.append(Problem("fusion", f"{config.fusion.type} fusion: LLaVA uses prefix tokens"))
        if model.language.spec.kind != "decoder" or model.language.config.model_type not in ("llama", "mistral"):
            problems.append(Problem("language", f"a {model.language.config.model_type} LM; llava-original holds LLaMA and Mistral"))
        if processor.template.name not in ("vicuna_v1", "plain"):
            problems.append(Problem("processor", f"template {processor.template.name!r}; LLaVA's conversations are vicuna_v1 and plain"))
        return problems

    def write(self, model: Any, processor: Any, config: ModelConfig, folder: Path) -> None:
        language, vision = model.language, model.vision
        tower_folder = folder / "vision_tower"
        data = language.config.to_dict()
        data.update({
            "architectures": ["LlavaLlamaForCausalLM" if data["model_type"] == "llama" else "LlavaMistralForCausalLM"],
            "model_type": "llava_llama" if data["model_type"] == "llama" else "llava_mistral",
            "mm_vision_tower": str(tower_folder.name), "mm_projector_type": config.connector.type,
            "mm_hidden_size": vision.hidden_size, "mm_vision_select_layer": vision.feature_layer,
            "mm_vision_select_feature": "patch" if vision.drop_cls else "cls_patch",
            "image_aspect_ratio": "pad" if processor.image_transform.aspect == "pad" else "square",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tokenizer_model_max_length": processor.max_length,
        })
        state = key_table(config.connector.type).to_format(model.state_dict(), "the model")
        with quiet_hf_progress():
            save_tensors(state, folder / "model.safetensors", {"format": "pt"})
            vision.tower.save_pretrained(tower_folder)
            from vlmkit.processing.hf_image import hf_image_processor

            hf_image_processor(processor.image_transform).save_pretrained(tower_folder)
            processor.tokenizer.save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps(data, indent=2))


def _fit_embeddings(model: Any, state: dict[str, torch.Tensor], where: str) -> None:
    """LLaVA's tokenizer has no ``<image>`` token (its code splices at id -200); vlmkit's has one, so
    the embedding matrices grow by the added rows, initialised to the mean embedding as transformers'
    ``resize_token_embeddings`` does."""
    for key in ("language.model.model.embed_tokens.weight", "language.model.lm_head.weight"):
        if key not in state:
            continue
        want = model.state_dict()[key].shape[0]
        have = state[key].shape[0]
        if have < want:
            extra = state[key].float().mean(0, keepdim=True).expand(want - have, -1).to(state[key].dtype)
            state[key] = torch.cat([state[key], extra])


FORMATS.register(LlavaOriginalFormat.name, LlavaOriginalFormat())
