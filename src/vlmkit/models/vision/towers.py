"""Registry entries for the vision tower families and the function that builds one from config.

Besides the named families, ``automodel`` takes any other vision tower ``transformers.AutoModel``
builds (DINOv2, DeiT, Swin, RegNet, ConvNeXt V2, ...): its layout (a sequence of tokens or a feature
map) and leading non-patch tokens are found by one probe forward. ``encoder: auto`` picks the named
family of the checkpoint's (or config's) ``model_type``, else ``automodel``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
import transformers

from vlmkit.models.hf_config import config_class_for, load_safetensors, make_hf_config, override_fields
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
from vlmkit.registry import ANY_MODEL_TYPE, is_auto

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
    VisionTowerSpec(
        name="blip2", model_class="Blip2VisionModel", config_class="Blip2VisionConfig",
        model_types=("blip_2_vision_model",), layout="sequence", has_cls=True,
        mean=CLIP_MEAN, std=CLIP_STD, description="BLIP-2's EVA-style ViT (fused qkv); its post-layernorm is the Q-Former's vision_norm",
        example="Salesforce/blip2-opt-2.7b", composite_prefix="vision_model",
    ),
    VisionTowerSpec(
        name="automodel", model_class="AutoModel", config_class="", model_types=(ANY_MODEL_TYPE,), layout="auto",
        has_cls=False, mean=IMAGENET_MEAN, std=IMAGENET_STD, patch_grid=False,
        description="any other AutoModel vision tower (DINOv2, DeiT, Swin, RegNet...); layout and CLS found by a probe",
        example="facebook/dinov2-small",
    ),
):
    VISION_TOWERS.register(_spec.name, _spec)


def _named_family(model_type: str) -> str | None:
    return next((n for n, s in VISION_TOWERS.items() if model_type in s.model_types), None)


def _generic_family() -> str:
    return next(n for n, s in VISION_TOWERS.items() if s.generic)


def family_for_vision_config(hf_config: Any) -> str:
    """The family id for a transformers vision config: the named family of its ``model_type``, else
    the generic ``automodel``."""
    return _named_family(hf_config.model_type) or _generic_family()


def resolve_encoder(encoder: str, pretrained: str | None, config: dict[str, Any], trust_remote_code: bool = False) -> str:
    """The family id to build: ``encoder`` itself, or for ``auto`` the named family of the
    checkpoint's ``model_type`` (or of its ``vision_config``; ``model.vision.config.model_type`` from
    scratch), else the generic ``automodel``.

    Raises:
        ValueError: ``auto`` without a model_type to go by.
    """
    if not is_auto(encoder):
        return encoder
    if pretrained:
        hf_config = transformers.AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        inner = getattr(hf_config, "vision_config", None)
        return (_named_family(hf_config.model_type) or (inner is not None and _named_family(inner.model_type))
                or _generic_family())
    if "model_type" in config:
        return _named_family(config["model_type"]) or _generic_family()
    raise ValueError(
        "model.vision.encoder=auto picks the tower family from a model_type: set model.vision.pretrained or "
        "model.vision.config.model_type, or name the family (vlmkit list encoders)"
    )


def _check_vision_model(tower: torch.nn.Module, where: str) -> None:
    """A generic tower must be a vision model alone: it takes ``pixel_values`` and nothing it cannot do without."""
    params = inspect.signature(tower.forward).parameters
    if "pixel_values" not in params:
        raise ValueError(f"{where}: {type(tower).__name__} takes no pixel_values, so it is not a vision tower")
    if "input_ids" in params:
        raise ValueError(
            f"{where}: {type(tower).__name__} is a composite (text + vision) model; use the encoder family of its vision "
            f"tower ({', '.join(n for n, s in VISION_TOWERS.items() if not s.generic)}) or a vision-only checkpoint"
        )


def _probe_layout(spec: VisionTowerSpec, tower: torch.nn.Module, image_size: int, feature_layer: int) -> VisionTowerSpec:
    """``spec`` with the layout and leading non-patch tokens of ``tower``'s hidden state ``feature_layer``,
    found by one forward pass on a zero image: 4-d maps are ``grid``; a sequence longer than the
    ``(S / patch_size)**2`` patches has that many leading tokens (CLS, distillation, registers).

    Raises:
        ValueError: the tower returns no hidden states, ``feature_layer`` is out of range, or a hidden
            state is neither ``(B, T, D)`` nor ``(B, C, H, W)``.
    """
    p = next(tower.parameters())
    probe = torch.zeros(1, 3, image_size, image_size, dtype=p.dtype, device=p.device)
    was_training = tower.training
    tower.eval()
    with torch.no_grad():
        out = tower(pixel_values=probe, output_hidden_states=True)
    tower.train(was_training)
    hidden = getattr(out, "hidden_states", None)
    name = type(tower).__name__
    if not hidden:
        raise ValueError(f"vision tower {name} returns no hidden_states, so no feature layer can be chosen")
    if not -len(hidden) <= feature_layer < len(hidden):
        raise ValueError(
            f"model.vision.feature_layer={feature_layer} is out of range: this {name} exposes {len(hidden)} hidden states "
            f"(valid: {-len(hidden)}..{len(hidden) - 1})"
        )
    feats = hidden[feature_layer]
    if feats.dim() == 4:
        return dataclasses.replace(spec, layout="grid", has_cls=False, prefix_tokens=0)
    if feats.dim() != 3:
        raise ValueError(f"vision tower {name}: hidden state of shape {tuple(feats.shape)} is neither (B, T, D) nor (B, C, H, W)")
    patch = getattr(tower.config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    patches = (image_size // patch) ** 2 if isinstance(patch, int) and patch > 0 else feats.shape[1]
    prefix = feats.shape[1] - patches if 0 < feats.shape[1] - patches < patches else 0
    return dataclasses.replace(spec, layout="sequence", has_cls=prefix > 0, prefix_tokens=prefix)


def read_preprocessor(path: str) -> dict[str, Any]:
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


def crop_size(pre: dict[str, Any]) -> int | None:
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
    """Build a :class:`VisionEncoder` from a family id (or ``auto``, see :func:`resolve_encoder`) and
    either pretrained weights (safetensors only) or a config (for ``automodel``, one with ``model_type``).

    Raises:
        RegistryError: unknown ``encoder`` (lists the valid ids).
        ValueError: the pretrained config's ``model_type`` does not belong to the family, a config
            field is unknown to the family's config class, or a generic tower is no vision model.
        FileNotFoundError: the checkpoint has no safetensors weights (only a pickle, say).
    """
    spec = VISION_TOWERS.get(resolve_encoder(encoder, pretrained, config, trust_remote_code))
    model_cls = getattr(transformers, spec.model_class)
    pre: dict[str, Any] = {}
    if pretrained:
        hf_config = transformers.AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        load_kwargs: dict[str, Any] = {}
        if not spec.generic and hf_config.model_type not in spec.model_types and hasattr(hf_config, "vision_config"):
            hf_config = hf_config.vision_config  # a composite checkpoint (CLIP, BLIP-2): its vision tower only
            if spec.composite_prefix:
                load_kwargs["key_mapping"] = {"^" + spec.composite_prefix + r"\.": ""}
        if not spec.generic and hf_config.model_type not in spec.model_types:
            hint = _named_family(hf_config.model_type) or _generic_family()
            raise ValueError(
                f"{pretrained} has model_type {hf_config.model_type!r}, which is not a {spec.name!r} tower "
                f"(accepts {', '.join(spec.model_types)}); use model.vision.encoder={hint}"
            )
        override_fields(hf_config, config, "model.vision.config")
        tower = load_safetensors(model_cls, pretrained, config=hf_config, dtype=dtype, trust_remote_code=trust_remote_code,
                                 **load_kwargs)
        pre = read_preprocessor(pretrained)
    elif spec.generic:
        if "model_type" not in config:
            raise ValueError(f"encoder {spec.name!r} builds from scratch from model.vision.config.model_type (e.g. dinov2, swin, regnet)")
        fields = {k: v for k, v in config.items() if k != "model_type"}
        config_cls = config_class_for(config["model_type"], "model.vision.config.model_type")
        tower = transformers.AutoModel.from_config(make_hf_config(config_cls, fields, "model.vision.config"))
    else:
        tower = model_cls(make_hf_config(spec.config_class, config, "model.vision.config"))
    if dtype is not None:
        tower = tower.to(dtype)
    size = int(image_size or crop_size(pre) or _config_image_size(tower.config) or 224)
    if spec.generic:
        _check_vision_model(tower, pretrained or "model.vision.config")
        spec = _probe_layout(spec, tower, size, feature_layer)
    mean = tuple(image_mean or pre.get("image_mean") or spec.mean)
    std = tuple(image_std or pre.get("image_std") or spec.std)
    return VisionEncoder(tower, spec, feature_layer, drop_cls, size, mean, std)


def _config_image_size(config: Any) -> int | None:
    size = getattr(config, "image_size", None)
    return size[0] if isinstance(size, (list, tuple)) else size
