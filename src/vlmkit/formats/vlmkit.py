"""vlmkit's own folder: the model described once, in ``vlmkit_config.json``.

::

    vlmkit_config.json      {"format": "vlmkit", "version": 1, "model": ModelConfig, "num_image_tokens": N}
                            with paths relative to the folder: template, system prompt, max length,
                            image transform and answers live here and nowhere else (the visual
                            token count is derived from them, recorded for tools that do not load
                            the model, such as sweeps)
    vision/                 the vision tower (transformers save_pretrained)
    connector.safetensors   the connector weights
    fusion.safetensors      the cross-attention blocks (cross_attention fusion only)
    language/               the language model (transformers save_pretrained; + heads.safetensors for
                            encoder-only backbones)
    tokenizer/              the tokenizer

The processor is rebuilt from the description by the same builder that built the model, so the
two cannot disagree. Folders of earlier versions also hold a ``processor_config.json``; it repeated
the description and is ignored.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from vlmkit.config import ModelConfig, from_dict, to_dict
from vlmkit.fileio import quiet_hf_progress, save_tensors
from vlmkit.formats.base import FORMATS, FormatError, LoadedModel, ModelFormat, ReadOptions, read_json

CONFIG_FILE = "vlmkit_config.json"


def saved_config(model: Any, processor: Any, cfg: ModelConfig) -> ModelConfig:
    """``cfg`` as a model folder records it: resolved family ids, the processor's image transform and
    template, sources replaced by the folder's relative paths."""
    saved = copy.deepcopy(cfg)
    saved.pretrained = None
    saved.vision.encoder = model.vision.spec.name  # the family `auto` resolved to
    saved.language.backbone = model.language.spec.name
    saved.vision.pretrained = "vision"
    saved.vision.config = {}
    saved.vision.image_size = processor.image_transform.size
    saved.vision.image_mean = list(processor.image_transform.mean)
    saved.vision.image_std = list(processor.image_transform.std)
    saved.vision.image_aspect = processor.image_transform.aspect
    saved.language.pretrained = "language"
    saved.language.config = {}
    saved.language.tokenizer.path = "tokenizer"
    saved.language.tokenizer.train_vocab_size = None
    saved.connector.pretrained = "connector.safetensors"
    saved.connector.options = model.connector.saved_options(cfg.connector.options)
    saved.language.preset = None
    saved.fusion.pretrained = "fusion.safetensors" if model.fusion.state_dict() else None
    saved.template = processor.template.name
    saved.system_prompt = processor.system_prompt
    saved.max_length = processor.max_length
    saved.answers = list(processor.answers)
    return saved


class VlmkitFormat(ModelFormat):
    name = "vlmkit"
    description = "vlmkit's own folder (vlmkit_config.json + vision/, language/, tokenizer/, connector.safetensors)"
    looks_for = "vlmkit_config.json"

    def detect(self, folder: Path) -> bool:
        return (folder / CONFIG_FILE).is_file()

    def write(self, model: Any, processor: Any, cfg: ModelConfig, folder: Path) -> None:
        saved = saved_config(model, processor, cfg)
        with quiet_hf_progress():
            model.vision.tower.save_pretrained(folder / "vision")
            model.language.save_pretrained(folder / "language")
            save_tensors(model.connector.state_dict(), folder / "connector.safetensors", {"connector": cfg.connector.type})
            fusion_state = model.fusion.state_dict()
            if fusion_state:
                save_tensors(fusion_state, folder / "fusion.safetensors", {"fusion": cfg.fusion.type})
            processor.tokenizer.save_pretrained(folder / "tokenizer")
        record = {"format": "vlmkit", "version": 1, "model": to_dict(saved), "num_image_tokens": model.num_image_tokens}
        (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2))

    def read(self, folder: Path, options: ReadOptions) -> LoadedModel:
        from vlmkit.models.build import build_model

        cfg = read_model_config(folder)
        if options.dtype:
            cfg.dtype = options.dtype
        with quiet_hf_progress():
            model, processor = build_model(cfg)
        model.eval()
        return LoadedModel(model, processor, cfg, self.name)


def read_model_config(folder: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a vlmkit model folder with its paths made absolute.

    Raises:
        FileNotFoundError: ``folder`` is not a vlmkit model folder.
        FormatError: the config file is not valid JSON.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {folder} is not a vlmkit model folder (save one with `vlmkit train`)")
    data = read_json(path)
    if "model" not in data:
        raise FormatError(f"{path} has no 'model' section")
    cfg = from_dict(ModelConfig, data["model"], "model")
    cfg.vision.pretrained = str(folder / cfg.vision.pretrained)
    cfg.language.pretrained = str(folder / cfg.language.pretrained)
    cfg.language.tokenizer.path = str(folder / cfg.language.tokenizer.path)
    cfg.connector.pretrained = str(folder / cfg.connector.pretrained)
    if cfg.fusion.pretrained:
        cfg.fusion.pretrained = str(folder / cfg.fusion.pretrained)
    return cfg


FORMATS.register(VlmkitFormat.name, VlmkitFormat())
