"""vlmkit image transforms <-> transformers image processors, with identical ``pixel_values``.

:func:`hf_image_processor` builds the transformers image processor (PIL backend) that computes what an
:class:`~vlmkit.processing.image.ImageTransform` computes:

========== ============================ ==========================================================
aspect     processor                    settings
========== ============================ ==========================================================
``crop``   ``CLIPImageProcessorPil``    ``size={"shortest_edge": S}``, ``crop_size`` ``S x S``
``pad``    ``LlavaImageProcessorPil``   as ``crop`` plus ``do_pad=True`` (pad to square, colour
                                        ``int(mean * 255)``, before the resize)
``resize`` ``BlipImageProcessorPil``    ``size={"height": S, "width": S}``, no crop
========== ============================ ==========================================================

all with bicubic resampling, ``rescale_factor=1/255``, the transform's mean/std and RGB conversion.
The two give the same ``pixel_values`` bit for bit (``torch.equal``): the geometry is the same Pillow
calls on the same 8-bit RGB image, and :meth:`ImageTransform.__call__` rescales and normalises in
transformers' order and dtypes. Two cases part, both by design of vlmkit:

* strips: beyond :data:`~vlmkit.processing.image.EXTREME_ASPECT` (the resized long side more than 8x the
  output for ``crop``, a side more than 8x the other for ``pad``) *and* with an intermediate image over
  :data:`~vlmkit.processing.image.RESAMPLE_PIXEL_BUDGET` pixels (2**24; e.g. a 20000x1 strip), vlmkit
  resamples only the kept window (``crop``) or shrinks before padding (``pad``) rather than allocate
  it; ``crop`` then differs by Pillow's rounding (a few levels), ``pad`` at the band edges, where the
  bicubic filter mixes image and padding in the other order;
* 16/32-bit greyscale (``I;16``, ``I``, ``F``): vlmkit scales by the value range, transformers clips at 255.

The processors are the PIL-backend classes, which work without torchvision. Their saved
``preprocessor_config.json`` names the class without the ``Pil`` suffix (``CLIPImageProcessor``), and
``AutoImageProcessor.from_pretrained`` picks the torchvision backend when torchvision is installed,
whose resize is torch's bicubic, not Pillow's, so pixels then differ slightly; load with
``AutoImageProcessor.from_pretrained(folder, backend="pil")`` for exact parity.

:func:`image_transform_from_hf` reads such a processor (or its config dict) back, and refuses what
an ``ImageTransform`` cannot reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vlmkit.processing.image import RESCALE_FACTOR, ImageTransform

#: PIL's BICUBIC filter id (``PIL.Image.Resampling.BICUBIC``), as saved in ``resample``.
BICUBIC = 3

# Processor classes whose preprocessing is fully described by the fields read below (without the
# "Pil"/"Fast" suffix). Others (ConvNext's crop_pct, ViT's defaults, tiling processors) may do more.
_KNOWN_TYPES = ("CLIPImageProcessor", "LlavaImageProcessor", "BlipImageProcessor", "SiglipImageProcessor")
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# class defaults for fields a config may leave out, as the transformers classes define them
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                           "do_center_crop": True, "default_to_square": False,
                           "image_mean": _OPENAI_CLIP_MEAN, "image_std": _OPENAI_CLIP_STD},
    "LlavaImageProcessor": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                            "do_center_crop": True, "do_pad": False, "default_to_square": False,
                            "image_mean": _OPENAI_CLIP_MEAN, "image_std": _OPENAI_CLIP_STD},
    "BlipImageProcessor": {"size": {"height": 384, "width": 384}, "default_to_square": True,
                           "image_mean": _OPENAI_CLIP_MEAN, "image_std": _OPENAI_CLIP_STD},
    "SiglipImageProcessor": {"size": {"height": 224, "width": 224}, "default_to_square": False,
                             "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
}
_COMMON_DEFAULTS = {"do_resize": True, "resample": BICUBIC, "do_rescale": True, "rescale_factor": RESCALE_FACTOR,
                    "do_normalize": True, "do_convert_rgb": True, "do_center_crop": False, "do_pad": False,
                    "default_to_square": True}
# fields that change the geometry in ways ImageTransform has no equivalent for
_UNSUPPORTED_FLAGS = ("crop_pct", "do_flip_channel_order", "do_random_crop", "do_image_splitting")


def hf_image_processor(transform: ImageTransform) -> Any:
    """The transformers image processor (PIL backend) whose ``pixel_values`` equal ``transform(image)``.

    ``processor(images=img, return_tensors="pt")["pixel_values"][0]`` is ``(3, S, S)`` float32 and
    ``torch.equal`` to ``transform(img)`` (see the module doc for the two exceptions).

    Returns:
        ``CLIPImageProcessorPil`` (``crop``), ``LlavaImageProcessorPil`` (``pad``) or
        ``BlipImageProcessorPil`` (``resize``).

    Raises:
        ValueError: the transform's aspect has no processor (cannot happen for a valid ImageTransform).
    """
    from transformers import BlipImageProcessorPil, CLIPImageProcessorPil, LlavaImageProcessorPil
    from transformers.image_utils import PILImageResampling

    side = int(transform.size)
    common = {
        "do_resize": True, "resample": PILImageResampling.BICUBIC, "do_rescale": True,
        "rescale_factor": RESCALE_FACTOR, "do_normalize": True, "image_mean": [float(m) for m in transform.mean],
        "image_std": [float(s) for s in transform.std], "do_convert_rgb": True,
    }
    square = {"height": side, "width": side}
    if transform.aspect == "crop":
        return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=square, do_center_crop=True, **common)
    if transform.aspect == "pad":
        # pad to square first, so the shortest-edge resize gives S x S and the center crop keeps it all
        return LlavaImageProcessorPil(size={"shortest_edge": side}, crop_size=square, do_center_crop=True,
                                      do_pad=True, **common)
    if transform.aspect == "resize":
        return BlipImageProcessorPil(size=square, do_center_crop=False, **common)
    raise ValueError(f"image aspect {transform.aspect!r} has no transformers image processor")


def image_transform_from_hf(processor_or_dict: Any) -> ImageTransform:
    """The :class:`ImageTransform` that computes what a transformers image processor computes.

    Args:
        processor_or_dict: an image processor, or its config dict (``preprocessor_config.json``
            contents; ``image_processor_type`` optional). ``size`` may be an int (read as transformers
            does: the shortest edge for CLIP/LLaVA/SigLIP, a square for BLIP or when the type is
            unknown, unless ``default_to_square`` says otherwise), ``{"shortest_edge": S}`` or
            ``{"height": S, "width": S}``; ``crop_size`` an int or ``{"height", "width"}``.
            ``do_normalize=False`` becomes mean 0 / std 1 (the same float32 values).

    Raises:
        ValueError: naming the field, when the processor asks for what ImageTransform cannot do: an
            unsupported ``image_processor_type``; ``do_resize`` false; ``resample`` other than bicubic;
            ``do_rescale`` false or a ``rescale_factor`` other than 1/255; ``do_convert_rgb`` false;
            a non-square ``size`` or ``crop_size``; a ``size`` with ``longest_edge``/``max_height``;
            a shortest-edge resize without a center crop to the same side (a non-square output, or a
            crop smaller than the resize like ImageNet's 256 -> 224); ``do_pad`` on a processor other
            than LLaVA's; mean/std without 3 channels; ``crop_pct`` and similar extra steps.
    """
    cfg = processor_or_dict.to_dict() if hasattr(processor_or_dict, "to_dict") else processor_or_dict
    if not isinstance(cfg, Mapping):
        raise ValueError(f"expected an image processor or its config dict, got {type(processor_or_dict).__name__}")
    kind = _base_type(cfg.get("image_processor_type"))
    if kind is None and cfg.get("image_processor_type"):
        raise ValueError(
            f"image processor field image_processor_type={cfg['image_processor_type']!r} is not supported; "
            f"supported: {', '.join(_KNOWN_TYPES)}"
        )
    defaults = {**_COMMON_DEFAULTS, **_CLASS_DEFAULTS.get(kind or "", {})}

    def get(key: str) -> Any:
        value = cfg.get(key)
        return defaults.get(key) if value is None else value

    for key in _UNSUPPORTED_FLAGS:
        if cfg.get(key):
            raise ValueError(f"image processor field {key}={cfg[key]!r} is not supported by ImageTransform")
    if not get("do_resize"):
        raise ValueError("image processor field do_resize=False is not supported: ImageTransform always resizes")
    resample = get("resample")
    try:
        resample_id = int(resample)
    except (TypeError, ValueError):
        resample_id = None
    if resample_id != BICUBIC:
        raise ValueError(f"image processor field resample={resample!r} is not supported: ImageTransform is bicubic (3)")
    if not get("do_rescale"):
        raise ValueError("image processor field do_rescale=False is not supported: ImageTransform rescales by 1/255")
    factor = get("rescale_factor")
    if not isinstance(factor, (int, float)) or not math.isclose(float(factor), RESCALE_FACTOR, rel_tol=1e-9):
        raise ValueError(f"image processor field rescale_factor={factor!r} is not supported: ImageTransform uses 1/255")
    if not get("do_convert_rgb"):
        raise ValueError("image processor field do_convert_rgb=False is not supported: ImageTransform converts to RGB")

    if get("do_normalize"):
        mean, std = _channels("image_mean", get("image_mean")), _channels("image_std", get("image_std"))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    side, shortest = _size(get("size"), bool(get("default_to_square")))
    crop = _crop_side(get("crop_size")) if get("do_center_crop") else None
    if get("do_pad"):
        if kind not in (None, "LlavaImageProcessor"):
            raise ValueError(
                f"image processor field do_pad=True on {cfg.get('image_processor_type')} is not a pad-to-square; "
                "only LlavaImageProcessor's is supported"
            )
        aspect = "pad"
    elif shortest:
        if crop is None:
            raise ValueError(
                f"image processor field do_center_crop is off with size={{'shortest_edge': {side}}}: the output "
                "would not be square, which ImageTransform cannot produce"
            )
        aspect = "crop"
    else:
        aspect = "resize"
    # after the pad or the square resize the image is side x side: a crop must keep all of it
    if crop is not None and crop != side:
        raise ValueError(
            f"image processor field crop_size={crop} differs from size={side}: ImageTransform crops only to the "
            "side it resizes to"
        )
    return ImageTransform(side, mean, std, aspect)


def _base_type(name: Any) -> str | None:
    """``CLIPImageProcessorPil`` / ``...Fast`` -> ``CLIPImageProcessor``; ``None`` when unknown or unset."""
    if not name:
        return None
    name = str(name)
    for suffix in ("Pil", "Fast"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name if name in _KNOWN_TYPES else None


def _channels(field: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3:
        raise ValueError(f"image processor field {field}={value!r} must have 3 channels (RGB)")
    return values  # type: ignore[return-value]


def _size(size: Any, default_to_square: bool) -> tuple[int, bool]:
    """``(side, is_shortest_edge)`` of a ``size`` field."""
    if isinstance(size, bool) or size is None:
        raise ValueError(f"image processor field size={size!r} is missing or not a size")
    if isinstance(size, int):
        return size, not default_to_square
    if isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, Mapping):
        raise ValueError(f"image processor field size={size!r} is not an int or a dict")
    keys = {k for k, v in size.items() if v is not None}
    if keys == {"shortest_edge"}:
        return int(size["shortest_edge"]), True
    if keys == {"height", "width"}:
        if size["height"] != size["width"]:
            raise ValueError(f"image processor field size={dict(size)} is not square; ImageTransform outputs S x S")
        return int(size["height"]), False
    raise ValueError(
        f"image processor field size={dict(size)} is not supported; use {{'shortest_edge': S}} or "
        "{'height': S, 'width': S}"
    )


def _crop_side(crop: Any) -> int:
    if isinstance(crop, int) and not isinstance(crop, bool):
        return crop
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        crop = {"height": crop[0], "width": crop[1]}
    if not isinstance(crop, Mapping) or {k for k, v in crop.items() if v is not None} != {"height", "width"}:
        raise ValueError(f"image processor field crop_size={crop!r} is not supported; use {{'height': S, 'width': S}}")
    if crop["height"] != crop["width"]:
        raise ValueError(
            f"image processor field crop_size={dict(crop)} is not square (do_center_crop with a non-square crop); "
            "ImageTransform outputs S x S"
        )
    return int(crop["height"])
