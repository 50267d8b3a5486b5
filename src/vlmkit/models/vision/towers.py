"""Registry entries for the vision tower families and the function that builds one from config."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import transformers

from vlmkit.models.hf_config import make_hf_config, override_fields
from vlmkit.models.vision.base import (
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VISION_TOWERS,
    VisionEncoder,
    VisionTowerSpec,
)

log = logging.getLogger(__name__)

for _spec in (
    VisionTowerSpec(
        name="clip", model_class="CLIPVisionModel", config_class="CLIPVisionConfig",
        model_types=("clip_vision_model", "clip"), layout="sequence", has_cls=True,
        mean=CLIP_MEAN, std=CLIP_STD, description="OpenAI CLIP ViT (LLaVA, BLIP-2 EVA-style towers)",
        example="openai/clip-vit-large-patch14-336",
    ),
    VisionTowerSpec(
        name="siglip", model_class="SiglipVisionModel", config_class="SiglipVisionConfig",
        model_types=("siglip_vision_model", "siglip"), layout="sequence", has_cls=False,
        mean=HALF, std=HALF, description="SigLIP ViT, no CLS token (Bunny, PaliGemma, Idefics3)",
        example="google/siglip-so400m-patch14-384",
    ),
    VisionTowerSpec(
        name="vit", model_class="ViTModel", config_class="ViTConfig",
        model_types=("vit",), layout="sequence", has_cls=True,
        mean=HALF, std=HALF, description="Plain ViT (Google/DeiT checkpoints)",
        example="google/vit-base-patch16-224-in21k",
    ),
    VisionTowerSpec(
        name="resnet", model_class="ResNetModel", config_class="ResNetConfig",
        model_types=("resnet",), layout="grid", has_cls=False,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, description="ResNet (BatchNorm); a stage's feature map becomes the tokens",
        example="microsoft/resnet-50",
    ),
    VisionTowerSpec(
        name="convnext", model_class="ConvNextModel", config_class="ConvNextConfig",
        model_types=("convnext",), layout="grid", has_cls=False,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, description="ConvNeXt (LayerNorm); feature map tokens",
        example="facebook/convnext-base-224",
    ),
    VisionTowerSpec(
        name="bit", model_class="BitModel", config_class="BitConfig",
        model_types=("bit",), layout="grid", has_cls=False,
        mean=HALF, std=HALF, description="BiT ResNet (GroupNorm + weight standardisation); trains well from scratch",
        example="google/bit-50",
    ),
):
    VISION_TOWERS.register(_spec.name, _spec)


def _read_preprocessor(path: str) -> dict[str, Any]:
    """The tower's ``preprocessor_config.json`` as a dict, or ``{}`` when it has none."""
    local = Path(path) / "preprocessor_config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(path).exists():
        return {}
    try:
        resolved = transformers.utils.cached_file(
            path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
        )
    except OSError:
        return {}
    return json.loads(Path(resolved).read_text()) if resolved else {}


def _crop_size(pre: dict[str, Any]) -> int | None:
    for key in ("crop_size", "size"):
        value = pre.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            for sub in ("height", "shortest_edge"):
                if sub in value:
                    return int(value[sub])
    return None


def build_vision_encoder(
    encoder: str,
    pretrained: str | None,
    config: dict[str, Any],
    feature_layer: int,
    drop_cls: bool,
    image_size: int | None,
    image_mean: list[float] | None,
    image_std: list[float] | None,
    dtype: Any = None,
    trust_remote_code: bool = False,
) -> VisionEncoder:
    """Build a :class:`VisionEncoder` from a family id and either pretrained weights or a config.

    Raises:
        RegistryError: unknown ``encoder`` (lists the valid ids).
        ValueError: the pretrained config's ``model_type`` does not belong to the family, or a config
            field is unknown to the family's config class.
    """
    spec = VISION_TOWERS.get(encoder)
    model_cls = getattr(transformers, spec.model_class)
    pre: dict[str, Any] = {}
    if pretrained:
        hf_config = transformers.AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        if hf_config.model_type not in spec.model_types and hasattr(hf_config, "vision_config"):
            hf_config = hf_config.vision_config
        if hf_config.model_type not in spec.model_types:
            matches = [n for n, s in VISION_TOWERS.items() if hf_config.model_type in s.model_types]
            raise ValueError(
                f"{pretrained} has model_type {hf_config.model_type!r}, which is not a {encoder!r} tower "
                f"(accepts {', '.join(spec.model_types)}); use model.vision.encoder="
                f"{matches[0] if matches else 'one of ' + ', '.join(VISION_TOWERS.names())}"
            )
        override_fields(hf_config, config, "model.vision.config")
        tower = model_cls.from_pretrained(pretrained, config=hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
        pre = _read_preprocessor(pretrained)
    else:
        tower = model_cls(make_hf_config(spec.config_class, config, "model.vision.config"))
        if dtype is not None:
            tower = tower.to(dtype)
    size = image_size or _crop_size(pre) or getattr(tower.config, "image_size", None) or 224
    mean = tuple(image_mean or pre.get("image_mean") or spec.mean)
    std = tuple(image_std or pre.get("image_std") or spec.std)
    return VisionEncoder(tower, spec, feature_layer, drop_cls, int(size), mean, std)
