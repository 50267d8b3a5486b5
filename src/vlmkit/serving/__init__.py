"""``vlmkit serve``: an OpenAI-compatible chat-completions server (FastAPI + uvicorn) with a web chat page.

``create_app(pipeline, ServeOptions(...))`` builds the app; :func:`serve` runs it with uvicorn.
Needs the ``serve`` extra (``pip install vlmkit[serve]``).
"""

from __future__ import annotations

from typing import Any

from vlmkit.serving.options import ServeOptions


def create_app(pipeline: Any, options: ServeOptions | None = None):
    """The FastAPI app for ``pipeline`` (see :func:`vlmkit.serving.app.create_app`)."""
    from vlmkit.serving.app import create_app as build

    return build(pipeline, options)


def serve(pipeline: Any, options: ServeOptions, log_level: str = "info") -> None:
    """Serve ``pipeline`` on ``options.host:options.port`` until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(create_app(pipeline, options), host=options.host, port=options.port, log_level=log_level)


__all__ = ["ServeOptions", "create_app", "serve"]
