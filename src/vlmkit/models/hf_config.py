"""Shared helpers for building Hugging Face configs from recipe fields."""

from __future__ import annotations

from typing import Any

import transformers


def make_hf_config(config_class: str, fields: dict[str, Any], where: str) -> Any:
    """Instantiate transformers' ``config_class`` with ``fields``.

    Raises:
        ValueError: a field the config class does not know; the message names ``where`` (the
            recipe key) and lists valid fields, instead of transformers silently storing it.
    """
    config_cls = getattr(transformers, config_class)
    valid = set(config_cls().to_dict())
    unknown = sorted(set(fields) - valid)
    if unknown:
        shown = ", ".join(sorted(k for k in valid if not k.startswith("_"))[:40])
        raise ValueError(f"{where} has key(s) {unknown} unknown to {config_class}; valid keys include: {shown}")
    return config_cls(**fields)


def override_fields(hf_config: Any, fields: dict[str, Any], where: str) -> Any:
    """Set ``fields`` on a loaded config; unknown names raise like :func:`make_hf_config`."""
    unknown = sorted(k for k in fields if not hasattr(hf_config, k))
    if unknown:
        raise ValueError(f"{where} has key(s) {unknown} unknown to {type(hf_config).__name__}")
    for key, value in fields.items():
        setattr(hf_config, key, value)
    return hf_config
