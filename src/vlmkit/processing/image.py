"""Image loading and transforms: any PIL mode to RGB, EXIF orientation, resize/crop or pad, normalise.

Transforms are written with Pillow and torch (no torchvision). ``crop`` matches CLIP's processor
(shortest side to ``size`` with bicubic resampling, then a center crop); ``pad`` is LLaVA-1.5's
``expand2square``: pad the short side with the mean colour, then resize; ``resize`` stretches to
``size x size`` (BLIP-2's processor).

The pixels equal those of the matching transformers image processor (PIL backend) bit for bit:
:mod:`vlmkit.processing.hf_image` builds it and states where the two part (strips whose intermediate
image would exceed :data:`RESAMPLE_PIXEL_BUDGET`, 16/32-bit greyscale input).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image could not be read; the message names the file."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB.

    Handles: palette (``P``, transparency included), ``RGBA``/``LA`` and ``RGB``/``L`` with a
    transparent colour key (composited on white so transparent pixels do not turn black), grey
    ``L``/``1``, ``CMYK``, ``YCbCr``, 16/32-bit ``I;16``/``I``/``F`` greyscale (scaled by their actual
    range, not clipped at 255, where transformers' ``convert_to_rgb`` clips them).
    """
    mode = image.mode
    if mode in ("RGB", "L") and image.info.get("transparency") is not None:
        # a PNG tRNS colour key: its pixels are transparent, so they become white like other transparency
        mode = "RGBA"
        image = image.convert("RGBA")
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode in ("I", "F") and arr.max() <= 255 and arr.min() >= 0:
            top = 255.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    return image.convert("RGB")


#: Largest image (width x height) that is decoded; Pillow's own decompression-bomb limit by default.
#: Larger files are refused with :class:`ImageError` before their pixels are read.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied (the first frame of an animation).

    Args:
        max_pixels: refuse images with more pixels than this (default :data:`MAX_IMAGE_PIXELS`); the
            size is read from the header, so a decompression bomb is refused before it is decoded.

    Raises:
        ImageError: the file is missing, not a file, unreadable, truncated, not an image, too large,
            or its pixels cannot be converted; the message names the path and the reason.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image file {path} does not exist")
    if not path.is_file():
        raise ImageError(f"image path {path} is not a file")
    return _decode(path, f"image file {path}", max_pixels)


def load_image_bytes(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode an encoded image (PNG, JPEG, ... bytes, e.g. from a base64 data URL) as :func:`load_image` does.

    Args:
        name: how messages refer to the image (e.g. the request field it came from).
        max_pixels: as in :func:`load_image`; checked from the header before the pixels are decoded.

    Raises:
        ImageError: the bytes are empty, not an image, truncated, too large or cannot be converted;
            the message names ``name`` and the reason.
    """
    if not data:
        raise ImageError(f"image {name} is empty (0 bytes)")
    return _decode(io.BytesIO(data), f"image {name}", max_pixels)


def _decode(source: Path | io.BytesIO, label: str, max_pixels: int | None) -> Image.Image:
    """Open ``source`` (a file path or a byte buffer) as RGB, refusing more than ``max_pixels`` pixels;
    ``label`` starts every error message (``image file PATH``, ``image NAME``)."""
    limit = max_pixels or MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it and raises above; both mean "too large" here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if width * height > limit:
                    raise _too_large(label, width, height, limit)
                if width < 1 or height < 1:
                    raise ImageError(f"{label} has no pixels ({width}x{height})")
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label} is too large to decode safely ({exc})") from None
    except (UnidentifiedImageError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{label} could not be decoded: {exc or type(exc).__name__}") from None
    except Exception as exc:  # Pillow's decoders raise OSError, ValueError, KeyError, struct.error, MemoryError, ...
        raise ImageError(f"{label} could not be decoded: {type(exc).__name__}: {exc}") from None


def _too_large(label: str, width: int, height: int, limit: int) -> ImageError:
    return ImageError(
        f"{label} is {width}x{height} = {width * height:,} pixels, more than the limit of {limit:,} "
        "(vlmkit.processing.image.MAX_IMAGE_PIXELS); it may be a decompression bomb"
    )


#: Beyond this aspect ratio (the resized long side over the output side for ``crop``, the long side over
#: the short one for ``pad``) a transform whose intermediate image would exceed
#: :data:`RESAMPLE_PIXEL_BUDGET` takes a shortcut: ``crop`` resamples only the kept window, ``pad``
#: shrinks before padding. Only then do pixels differ from transformers' (which builds the full image).
EXTREME_ASPECT = 8

#: Most pixels of an intermediate image (the shortest-side resize, the padded square) built for an
#: extreme aspect ratio: 2**24 (about 50 MB of RGB). A 20000x1 strip would otherwise need 20000^2.
RESAMPLE_PIXEL_BUDGET = 1 << 24

#: The aspect choices of :class:`ImageTransform`.
ASPECTS = ("crop", "pad", "resize")

#: 8-bit pixels to [0, 1]; the same float as transformers' default ``rescale_factor``.
RESCALE_FACTOR = 1 / 255


@dataclass(frozen=True)
class ImageTransform:
    """RGB image -> normalised tensor ``(3, size, size)`` (float32).

    Args:
        size: output side in pixels.
        mean / std: per-channel normalisation (0-1 scale).
        aspect: ``crop`` (resize shortest side, center-crop), ``pad`` (pad to square with the mean
            colour, then resize) or ``resize`` (stretch to ``size x size``, the aspect ratio is not kept).
            Resampling is bicubic throughout.

    Raises:
        ValueError: an unknown ``aspect``.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: str = "crop"

    def __post_init__(self) -> None:
        if self.aspect not in ASPECTS:
            raise ValueError(f"image aspect {self.aspect!r} is not valid; choose 'crop', 'pad' or 'resize'")

    def geometry(self, image: Image.Image) -> Image.Image:
        """Resize/crop, pad+resize or stretch to ``size x size`` (still a PIL image)."""
        image = to_rgb(image)
        if self.aspect == "resize":
            # Pillow returns a copy when the size already matches, as transformers' resize does
            return image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        if self.aspect == "pad":
            w, h = image.size
            if w != h:
                side = max(w, h)
                # truncated, not rounded: LLaVA-1.5's expand2square and transformers' LlavaImageProcessor
                # both use int(m * 255) (CLIP's mean gives (122, 116, 104), rounding would give (123, 117, 104))
                fill = tuple(int(m * 255) for m in self.mean)
                if side > EXTREME_ASPECT * min(w, h) and side > self.size and side * side > RESAMPLE_PIXEL_BUDGET:
                    # a 100000x1 strip would need a 100000^2 canvas: shrink first, then pad (smaller strips
                    # take the full path, whose pixels match transformers')
                    scale = self.size / side
                    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
                    w, h, side = *image.size, self.size
                canvas = Image.new("RGB", (side, side), fill)
                canvas.paste(image, ((side - w) // 2, (side - h) // 2))
                image = canvas
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
            return image
        w, h = image.size
        if min(w, h) != self.size:
            # same arithmetic as transformers' resize(shortest_edge): the long side is truncated
            new = (self.size, int(self.size * h / w)) if w <= h else (int(self.size * w / h), self.size)
            if max(new) > EXTREME_ASPECT * self.size and new[0] * new[1] > RESAMPLE_PIXEL_BUDGET:
                # a 100000x1 strip would become a 6.4M x 64 intermediate: resample only the kept window
                # (the same source coordinates as resize-then-crop; Pillow's rounding may differ slightly)
                left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
                sx, sy = new[0] / w, new[1] / h
                box = (left / sx, top / sy, (left + self.size) / sx, (top + self.size) / sy)
                return image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
            image = image.resize(new, Image.Resampling.BICUBIC)
            w, h = image.size
        left = (w - self.size) // 2
        top = (h - self.size) // 2
        if (left, top, w, h) != (0, 0, self.size, self.size):
            image = image.crop((left, top, left + self.size, top + self.size))
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Normalised pixels ``(3, size, size)`` float32."""
        # transformers' order and dtypes, so pixel_values match its processors bit for bit: rescale in
        # float64 by the factor 1/255, round to float32, then (x - mean) / std in float32
        arr = (np.asarray(self.geometry(image), dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1)))
