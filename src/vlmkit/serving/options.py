"""The server's settings and limits (``vlmkit serve`` options), with safe defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Default request-body limit: 20 MiB (a few base64 images of several megapixels).
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
#: Default image limit: 4096 x 4096 pixels, checked from the header before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ServeOptions:
    """How ``vlmkit serve`` listens and what it accepts.

    Args:
        model_name: the id clients send as ``model`` (``vlmkit serve`` uses the model folder's name).
        host / port: where to listen; 127.0.0.1 (this machine only) unless told otherwise.
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>`` (401 otherwise).
        max_body_bytes: largest request body (413 beyond), base64 images included.
        max_image_pixels: largest image (width x height), refused from its header before decoding (400).
        max_images_per_request: most images in one request, all turns together (400 beyond).
        max_tokens: most tokens one answer may ask for (400 beyond); also the default when a request
            names none (capped by what the context leaves after the prompt).
        max_queued: most requests waiting or generating at once (429 beyond).
        max_batch_size: most requests decoded together in one step.
        allow_remote_images: fetch ``http(s)://`` image URLs (refused when off: a server should not
            make requests on a client's behalf unless told to).
        remote_timeout_s: time limit of one remote image download.
        allowed_local_media_path: serve ``file://`` image URLs from inside this folder only (no ``..``,
            no symlink that leads out); ``None`` refuses every ``file://`` URL.

    Raises:
        ValueError: a limit is not positive, or the port is out of range.
    """

    model_name: str = "vlmkit"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images_per_request: int = 8
    max_tokens: int = 1024
    max_queued: int = 64
    max_batch_size: int = 32
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0
    allowed_local_media_path: Path | None = None

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_pixels", "max_images_per_request", "max_tokens", "max_queued",
                     "max_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"serve option {name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"serve option port must be in 0-65535, got {self.port}")
        if self.remote_timeout_s <= 0:
            raise ValueError(f"serve option remote_timeout_s must be > 0, got {self.remote_timeout_s}")
        if not self.model_name:
            raise ValueError("serve option model_name must not be empty")
        if self.api_key is not None and not self.api_key:
            raise ValueError("serve option api_key must not be empty (leave it unset to serve without a key)")
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path)
            if not root.is_dir():
                raise ValueError(f"--allowed-local-media-path {root} is not a folder")
            object.__setattr__(self, "allowed_local_media_path", root.resolve())
