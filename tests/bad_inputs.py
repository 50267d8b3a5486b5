"""A corpus of awkward and broken images and data rows, made in the test (nothing is downloaded).

``IMAGES`` maps a kind to ``(writer, good)``: the writer saves one file of that kind under the given
path (the file name's extension is the writer's business) and ``good`` says whether a correct loader
reads it (an unusual but valid file) or must refuse it with a clear error (a broken or unsafe one).
``ROWS`` maps a kind of bad LLaVA-data row or file to ``(text writer, expected message)``.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def _picture(size=(48, 40), mode: str = "RGB") -> Image.Image:
    """A picture with structure (a gradient and a square) so that orientation and crops are visible."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    arr[: h // 3, : w // 3, 2] = 255
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A real 4x4 PNG whose IHDR claims ``width x height`` (a decompression bomb's header, a few bytes)."""
    raw = bytearray(_png_bytes(_picture((4, 4))))
    start = 8 + 8  # signature, then length + "IHDR"
    raw[start : start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(raw[12 : start + 13])) & 0xFFFFFFFF
    raw[start + 13 : start + 17] = struct.pack(">I", crc)
    return bytes(raw)


def _write(data: bytes) -> Callable[[Path], Path]:
    def writer(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return writer


def _save(img_fn: Callable[[], Image.Image], fmt: str, **kw) -> Callable[[Path], Path]:
    def writer(path: Path) -> Path:
        img_fn().save(path, fmt, **kw)
        return path

    return writer


def _sixteen_bit(path: Path) -> Path:
    arr = (np.linspace(0, 65535, 48 * 40).reshape(40, 48)).astype(np.uint16)
    Image.fromarray(arr).save(path, "PNG")  # uint16 -> mode I;16
    return path


def _palette_transparent(path: Path) -> Path:
    img = _picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.save(path, "PNG", transparency=0)
    return path


def _animated_gif(path: Path) -> Path:
    frames = [_picture().convert("P"), Image.new("RGB", (48, 40), (0, 255, 0)).convert("P")]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


def _exif_rotated(path: Path) -> Path:
    img = _picture((48, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(path, "JPEG", exif=exif.tobytes())
    return path


def _bad_exif(path: Path) -> Path:
    img = _picture((48, 40))
    exif = Image.Exif()
    exif[0x0112] = 77  # not a valid orientation
    img.save(path, "JPEG", exif=exif.tobytes())
    return path


def _multipage_tiff(path: Path) -> Path:
    _picture().save(path, "TIFF", save_all=True, append_images=[Image.new("RGB", (48, 40), (9, 9, 9))])
    return path


def _float_tiff(path: Path) -> Path:
    Image.fromarray(np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(40, 48)).save(path, "TIFF")
    return path


def _int32_tiff(path: Path) -> Path:
    Image.fromarray(np.arange(48 * 40, dtype=np.int32).reshape(40, 48) * 1000).save(path, "TIFF")
    return path


def _corrupt_middle(path: Path) -> Path:
    raw = bytearray(_png_bytes(_picture((64, 64))))
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(64)  # zeroes over the compressed pixel data (and its CRC check)
    path.write_bytes(bytes(raw))
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


def _missing(path: Path) -> Path:
    return path  # never written


_PNG = _png_bytes(_picture((64, 64)))
_JPEG = _jpeg_bytes(_picture((64, 64)))

#: kind -> (writer(path) -> path, good)
IMAGES: dict[str, tuple[Callable[[Path], Path], bool]] = {
    # broken or unsafe: refused with a named error
    "zero-bytes": (_write(b""), False),
    "truncated-png": (_write(_PNG[: len(_PNG) // 2]), False),
    "truncated-jpeg": (_write(_JPEG[: len(_JPEG) // 2]), False),
    "png-signature-only": (_write(_PNG[:8]), False),
    "jpeg-header-only": (_write(_JPEG[:20]), False),
    "text-with-image-extension": (_write(b"this is not an image, only text\n"), False),
    "html-error-page": (_write(b"<!DOCTYPE html><html><body>404 Not Found</body></html>"), False),
    "svg": (_write(b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>'), False),
    "gzip-of-a-png": (_write(gzip.compress(_PNG)), False),
    "corrupt-pixel-data": (_corrupt_middle, False),
    "decompression-bomb-header": (_write(_png_with_header_size(60_000, 60_000)), False),
    "over-the-pixel-limit": (_write(_png_with_header_size(10_000, 10_000)), False),
    "zero-width-header": (_write(_png_with_header_size(0, 4)), False),
    "directory-named-like-an-image": (_directory, False),
    "missing-file": (_missing, False),
    # unusual but valid: read as RGB
    "rgb-png": (_save(_picture, "PNG"), True),
    "rgba-png": (_save(lambda: _picture(mode="RGBA"), "PNG"), True),
    "grey-la-png": (_save(lambda: _picture(mode="LA"), "PNG"), True),
    "one-bit-png": (_save(lambda: _picture(mode="1"), "PNG"), True),
    "sixteen-bit-png": (_sixteen_bit, True),
    "palette-with-transparency": (_palette_transparent, True),
    "interlaced-png": (_save(_picture, "PNG", optimize=False), True),
    "png-with-trailing-garbage": (_write(_PNG + b"garbage after IEND" * 10), True),
    "cmyk-jpeg": (_save(lambda: _picture(mode="CMYK"), "JPEG"), True),
    "grey-jpeg": (_save(lambda: _picture(mode="L"), "JPEG"), True),
    "progressive-jpeg": (_save(_picture, "JPEG", progressive=True), True),
    "exif-rotated-jpeg": (_exif_rotated, True),
    "invalid-exif-orientation": (_bad_exif, True),
    "animated-gif": (_animated_gif, True),
    "multipage-tiff": (_multipage_tiff, True),
    "float-tiff": (_float_tiff, True),
    "int32-tiff": (_int32_tiff, True),
    "bmp": (_save(_picture, "BMP"), True),
    "webp": (_save(_picture, "WEBP"), True),
    "one-by-one": (_save(lambda: Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), True),
    "wide-strip-20000x1": (_save(lambda: _picture((20_000, 1)), "PNG"), True),
    "tall-strip-1x20000": (_save(lambda: _picture((1, 20_000)), "PNG"), True),
}


def write_images(folder: Path, name: Callable[[str], str] = lambda kind: f"{kind}.png") -> dict[str, Path]:
    """Every kind of :data:`IMAGES` written into ``folder`` (file names from ``name(kind)``)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {kind: writer(folder / name(kind)) for kind, (writer, _) in IMAGES.items()}


GOOD_IMAGES = [k for k, (_, good) in IMAGES.items() if good]
BAD_IMAGES = [k for k, (_, good) in IMAGES.items() if not good]


def _row(image: str | None = "ok.png", human="<image>\nwhat is it?", gpt="a picture", **extra) -> dict:
    row = {"id": "r", "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}], **extra}
    if image is not None:
        row["image"] = image
    return row


def _json(rows) -> bytes:
    return json.dumps(rows).encode()


#: kind -> (file name, file bytes, expected message fragment)
ROWS: dict[str, tuple[str, bytes, str]] = {
    "non-utf8-json": ("data.json", json.dumps([_row(gpt="caf\u00e9")]).encode().replace(b"caf\\u00e9", "café".encode("latin-1")),
                      "is not UTF-8 text"),
    "empty-file": ("data.json", b"", "is not valid JSON"),
    "top-level-object": ("data.json", _json({"rows": [_row()]}), "must hold a list of conversation rows"),
    "jsonl-row-is-a-list": ("data.jsonl", b"[1, 2, 3]\n", "line 1: a row must be an object"),
    "jsonl-line-not-json": ("data.jsonl", json.dumps(_row()).encode() + b"\n{broken\n", "line 2: not valid JSON"),
    "row-is-null": ("data.json", _json([None]), "row 0: a row must be an object"),
    "row-is-a-string": ("data.json", _json(["hello"]), "row 0: a row must be an object"),
    "no-conversations": ("data.json", _json([{"id": "r", "image": "ok.png"}]), "'conversations' is missing or empty"),
    "conversations-not-a-list": ("data.json", _json([{"id": "r", "image": "ok.png", "conversations": "hi"}]),
                                 "'conversations' is missing or empty"),
    "turn-without-value": ("data.json", _json([{"image": "ok.png", "conversations": [{"from": "human"}]}]),
                           "turn 0 must be an object with 'from' and 'value'"),
    "unknown-role": ("data.json", _json([{"image": "ok.png", "conversations": [{"from": "bot", "value": "x"}]}]),
                     "'from'='bot'"),
    "value-not-a-string": ("data.json", _json([_row(gpt=42)]), "'value' must be a string"),
    "ends-with-human": ("data.json", _json([{"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}]),
                        "the last turn must be gpt"),
    "image-is-a-number": ("data.json", _json([_row(image=7)]), "'image' must be a path string"),
    "image-path-empty": ("data.json", _json([_row(image="")]), "is not a file"),
    "placeholder-without-image": ("data.json", _json([_row(image=None)]), "1 <image> placeholder(s) but the row has 0 image(s)"),
    "image-without-placeholder": ("data.json", _json([_row(human="what is it?")]), "0 <image> placeholder(s) but the row has 1"),
    "image-file-missing": ("data.json", _json([_row(image="nowhere.png")]), "nowhere.png does not exist"),
    "placeholder-in-reply": ("data.json", _json([_row(human="what is it?", gpt="<image>")]), "may only appear in human turns"),
}
