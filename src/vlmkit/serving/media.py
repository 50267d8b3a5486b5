"""Image URLs of chat requests -> RGB PIL images, with the server's limits and media policy.

* ``data:image/...;base64,...`` (and percent-encoded ``data:`` URLs): always accepted.
* ``http://`` / ``https://``: fetched only with ``allow_remote_images`` (off by default: a server that
  fetches any URL a client names can be made to reach hosts the client cannot).
* ``file://``: only with ``allowed_local_media_path``, and then only files inside that folder: the
  path must be absolute, may not contain ``..``, and is resolved (symlinks followed) before the
  containment check, so a symlink that leads out is refused.

Decoding goes through :func:`vlmkit.processing.image.load_image_bytes` / ``load_image``: the size is
read from the header and checked against ``max_image_pixels`` before any pixel is decoded.
Every failure is a 400 :class:`~vlmkit.serving.protocol.RequestError` naming the request field.
Blocking (downloads, decoding): call from a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image

from vlmkit.processing.image import ImageError, load_image, load_image_bytes
from vlmkit.serving.options import ServeOptions
from vlmkit.serving.protocol import RequestError, bad

SCHEMES = "data:, http(s):// or file://"


def load_image_url(url: str, param: str, options: ServeOptions) -> Image.Image:
    """The RGB image at ``url`` (the value of request field ``param``).

    Raises:
        RequestError: 400: an unknown scheme, a malformed ``data:`` URL, invalid base64, a media type
            that is not an image, a refused remote or local URL, a failed download, bytes that are not
            an image or an image over ``options.max_image_pixels``.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    try:
        if scheme == "data":
            return load_image_bytes(decode_data_url(url, param), param, options.max_image_pixels)
        if scheme in ("http", "https"):
            return load_image_bytes(_fetch(url, param, options), param, options.max_image_pixels)
        if scheme == "file":
            return load_image(local_path(url, param, options.allowed_local_media_path), options.max_image_pixels)
    except ImageError as exc:
        raise bad(param, str(exc), "invalid_image") from None
    raise bad(param, f"must be a {SCHEMES} URL, got {_preview(url)}", "invalid_image_url")


def decode_data_url(url: str, param: str) -> bytes:
    """The bytes of a ``data:[<media type>][;base64],<data>`` URL (whitespace in base64 is ignored,
    missing ``=`` padding and the URL-safe alphabet are accepted).

    Raises:
        RequestError: 400: no comma, a media type that is not ``image/*``, or invalid base64.
    """
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise bad(param, "is a data: URL without the ',' that starts its data", "invalid_image_url")
    fields = [f.strip().lower() for f in header.split(";")]
    media_type = fields[0]
    if media_type and not media_type.startswith("image/"):
        raise bad(param, f"the data: URL holds {media_type!r}, not an image (image/png, image/jpeg, ...)",
                  "invalid_image")
    if "base64" not in fields[1:]:
        return urllib.parse.unquote_to_bytes(payload)
    compact = "".join(payload.split())
    compact += "=" * (-len(compact) % 4)
    try:
        if "-" in compact or "_" in compact:
            return base64.b64decode(compact, altchars=b"-_", validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad(param, f"the data: URL is not valid base64 ({exc})", "invalid_base64") from None


def local_path(url: str, param: str, root: Path | None) -> Path:
    """The file a ``file://`` URL names, checked to lie inside ``root`` (resolved, symlinks followed).

    Raises:
        RequestError: 400: ``root`` is ``None`` (file URLs are off), a host other than ``localhost``,
            a relative path, a ``..`` component, a path outside ``root``, or no such file.
    """
    if root is None:
        raise bad(param, "file:// image URLs are refused; start the server with --allowed-local-media-path DIR to "
                         "serve images from DIR, or send the image as a data: URL", "local_images_disabled")
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad(param, f"a file:// URL may not name a host ({parsed.netloc!r})", "invalid_image_url")
    raw = urllib.parse.unquote(parsed.path)
    if "\x00" in raw:
        raise bad(param, "the file path contains a NUL character", "invalid_image_url")
    path = Path(raw)
    if not path.is_absolute():
        raise bad(param, "a file:// URL needs an absolute path (file:///dir/image.png)", "invalid_image_url")
    if ".." in path.parts:
        raise bad(param, "a file:// path may not contain '..'", "invalid_image_url")
    real = path.resolve()
    if not real.is_relative_to(root):
        raise bad(param, f"the file is outside the folder this server may read (--allowed-local-media-path {root})",
                  "local_image_refused")
    if not real.is_file():
        raise bad(param, f"no image file {path}", "invalid_image_url")
    return real


def _fetch(url: str, param: str, options: ServeOptions) -> bytes:
    if not options.allow_remote_images:
        raise bad(param, "http(s) image URLs are refused; start the server with --allow-remote-images to fetch them, "
                         "or send the image as a data: URL", "remote_images_disabled")
    limit = options.max_body_bytes
    request = urllib.request.Request(url, headers={"User-Agent": "vlmkit-serve"})
    try:
        with urllib.request.urlopen(request, timeout=options.remote_timeout_s) as response:
            data = response.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise bad(param, f"fetching {_preview(url)} failed: HTTP {exc.code} {exc.reason}", "image_fetch_failed") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise bad(param, f"fetching {_preview(url)} failed: {reason}", "image_fetch_failed") from None
    if len(data) > limit:
        raise bad(param, f"the image at {_preview(url)} is larger than {limit:,} bytes (--max-body-bytes)",
                  "image_too_large")
    return data


def _preview(url: str, keep: int = 80) -> str:
    return repr(url if len(url) <= keep else url[:keep] + "...")


__all__ = ["RequestError", "decode_data_url", "load_image_url", "local_path"]
