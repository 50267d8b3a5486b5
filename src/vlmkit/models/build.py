"""The only place that turns configuration into objects: model + processor, and the model folder format.

A saved model folder holds::

    vlmkit_config.json      model config with paths relative to the folder
    vision/                 the vision tower (transformers save_pretrained)
    connector.safetensors   the connector weights
    language/               the language model (transformers save_pretrained)
    tokenizer/              the tokenizer
    processor_config.json   template, image transform, visual tokens per image
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import ModelConfig, from_dict, to_dict
from vlmkit.fileio import atomic_directory, load_tensors, quiet_hf_progress, save_tensors
from vlmkit.models.connectors import CONNECTORS
from vlmkit.models.language import BACKBONES, build_language_model
from vlmkit.models.vision import build_vision_encoder
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.image import ImageTransform
from vlmkit.processing.processor import VLMProcessor
from vlmkit.processing.templates import resolve_template
from vlmkit.processing.tokenizer import load_tokenizer, prepare_tokenizer, train_bpe_tokenizer

CONFIG_FILE = "vlmkit_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tokenizer(cfg: ModelConfig, texts: Iterable[str] | None = None) -> Any:
    """The tokenizer the model config asks for.

    Raises:
        ValueError: a from-scratch tokenizer is requested without training text, or no source is given.
    """
    tok_cfg = cfg.language.tokenizer
    if tok_cfg.path:
        tokenizer = load_tokenizer(tok_cfg.path, cfg.trust_remote_code)
    elif tok_cfg.train_vocab_size:
        if texts is None:
            raise ValueError("model.language.tokenizer.train_vocab_size is set but no training text was given to train it on")
        tokenizer = train_bpe_tokenizer(texts, tok_cfg.train_vocab_size)
    elif cfg.language.pretrained:
        tokenizer = load_tokenizer(cfg.language.pretrained, cfg.trust_remote_code)
    else:
        raise ValueError(
            "model.language has no tokenizer source: set model.language.pretrained, "
            "model.language.tokenizer.path, or model.language.tokenizer.train_vocab_size"
        )
    return prepare_tokenizer(tokenizer)


def build_model(
    cfg: ModelConfig, tokenizer: Any | None = None, tokenizer_texts: Iterable[str] | None = None
) -> tuple[VisionLanguageModel, VLMProcessor]:
    """Build the model and its processor from ``cfg``.

    Args:
        tokenizer: use this tokenizer instead of the one ``cfg`` names.
        tokenizer_texts: text to train a tokenizer on when ``cfg`` asks for one.

    Raises:
        RegistryError: unknown encoder, connector, backbone or template id (lists valid ids).
        ValueError: inconsistent pieces (e.g. an unknown config key of a Hugging Face config).
    """
    dtype = DTYPES[cfg.dtype]
    tokenizer = prepare_tokenizer(tokenizer) if tokenizer is not None else build_tokenizer(cfg, tokenizer_texts)
    spec = BACKBONES.get(cfg.language.backbone)
    v = cfg.vision
    vision = build_vision_encoder(
        v.encoder, v.pretrained, v.config, v.feature_layer, v.drop_cls, v.image_size, v.image_mean, v.image_std,
        dtype=dtype, trust_remote_code=cfg.trust_remote_code,
    )
    language = build_language_model(
        cfg.language.backbone, cfg.language.pretrained, cfg.language.config, vocab_size=len(tokenizer),
        dtype=dtype, trust_remote_code=cfg.trust_remote_code,
    )
    factory = CONNECTORS.get(cfg.connector.type)
    try:
        connector = factory(vision.hidden_size, language.hidden_size, vision.num_tokens, **cfg.connector.options)
    except TypeError as exc:
        raise ValueError(f"model.connector.options {cfg.connector.options} do not fit connector {cfg.connector.type!r}: {exc}") from None
    connector.to(dtype)
    if cfg.connector.pretrained:
        load_connector(connector, cfg.connector.pretrained)
    template = resolve_template(cfg.template, tokenizer, spec.default_template)
    transform = ImageTransform(vision.image_size, vision.image_mean, vision.image_std, v.image_aspect)
    processor = VLMProcessor(tokenizer, template, transform, connector.num_output_tokens, cfg.max_length, cfg.system_prompt)
    model = VisionLanguageModel(vision, connector, language, processor.image_token_id)
    return model, processor


def load_connector(connector: torch.nn.Module, path: str | Path) -> None:
    """Load connector weights from a safetensors file (strict).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the weights do not fit this connector (names the missing/unexpected keys).
    """
    state = load_tensors(path)
    missing, unexpected = connector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the connector: missing {missing}, unexpected {unexpected}")


def save_model(model: VisionLanguageModel, processor: VLMProcessor, cfg: ModelConfig, folder: str | Path) -> Path:
    """Write a complete model folder atomically (see module docstring). LoRA must be merged first.

    Raises:
        ValueError: a part still carries unmerged LoRA adapters.
    """
    from vlmkit.training.lora import has_lora

    for name, part in model.parts().items():
        if has_lora(part):
            raise ValueError(f"the {name} part has unmerged LoRA adapters; merge them before saving a full model")
    folder = Path(folder)
    saved = copy.deepcopy(cfg)
    saved.vision.pretrained = "vision"
    saved.vision.config = {}
    saved.vision.image_size = processor.image_transform.size
    saved.vision.image_mean = list(processor.image_transform.mean)
    saved.vision.image_std = list(processor.image_transform.std)
    saved.language.pretrained = "language"
    saved.language.config = {}
    saved.language.tokenizer.path = "tokenizer"
    saved.language.tokenizer.train_vocab_size = None
    saved.connector.pretrained = "connector.safetensors"
    saved.template = processor.template.name
    with atomic_directory(folder) as tmp, quiet_hf_progress():
        model.vision.tower.save_pretrained(tmp / "vision")
        model.language.hf_model.save_pretrained(tmp / "language")
        save_tensors(model.connector.state_dict(), tmp / "connector.safetensors", {"connector": cfg.connector.type})
        processor.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": "vlmkit", "version": 1, "model": to_dict(saved)}, indent=2))
    return folder


def read_model_config(folder: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a saved folder with its paths made absolute.

    Raises:
        FileNotFoundError: ``folder`` is not a vlmkit model folder.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {folder} is not a vlmkit model folder (save one with `vlmkit train`)")
    data = json.loads(path.read_text())
    cfg = from_dict(ModelConfig, data["model"], "model")
    cfg.vision.pretrained = str(folder / cfg.vision.pretrained)
    cfg.language.pretrained = str(folder / cfg.language.pretrained)
    cfg.language.tokenizer.path = str(folder / cfg.language.tokenizer.path)
    cfg.connector.pretrained = str(folder / cfg.connector.pretrained)
    return cfg


def load_model(folder: str | Path, dtype: str | None = None) -> tuple[VisionLanguageModel, VLMProcessor]:
    """Load a model folder written by :func:`save_model`; ``dtype`` overrides the saved one."""
    cfg = read_model_config(folder)
    if dtype:
        cfg.dtype = dtype
    with quiet_hf_progress():
        model, _ = build_model(cfg)
    processor = VLMProcessor.from_pretrained(folder)
    model.eval()
    return model, processor
