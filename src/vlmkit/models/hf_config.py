"""Shared helpers for Hugging Face configs built from recipe fields and for loading weights."""

from __future__ import annotations

import contextlib
import contextvars
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers

#: weight files that are Python pickles (loading one can run arbitrary code)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

#: False inside :func:`without_weights`: :func:`load_safetensors` builds from the checkpoint's config only
_READ_WEIGHTS: contextvars.ContextVar[bool] = contextvars.ContextVar("vlmkit_read_weights", default=True)
#: ``from_pretrained`` keyword arguments that concern reading weights, not building the architecture
_LOAD_ONLY_KWARGS = ("use_safetensors", "key_mapping", "local_files_only", "output_loading_info", "revision")


@contextlib.contextmanager
def without_weights() -> Iterator[None]:
    """Build models on the meta device, reading no weights: inside, :func:`load_safetensors` builds
    the checkpoint's architecture from its ``config.json`` (same parameter names, shapes and dtypes as
    the real load, no storage), and every module created is on the meta device. What a run's
    non-main processes build when rank 0 sends them the weights (``train.rank0_loading``)."""
    token = _READ_WEIGHTS.set(False)
    try:
        with torch.device("meta"):
            yield
    finally:
        _READ_WEIGHTS.reset(token)


def config_class_for(model_type: str, where: str) -> type:
    """The transformers config class registered for ``model_type``.

    Raises:
        ValueError: transformers has no such ``model_type``; the message names ``where``.
    """
    try:
        return transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(f"{where}: model_type {model_type!r} is not a model type this transformers version knows") from None


def make_hf_config(config_class: str | type, fields: dict[str, Any], where: str) -> Any:
    """Instantiate transformers' ``config_class`` (a class or its name) with ``fields``.

    Raises:
        ValueError: a field the config class does not know; the message names ``where`` (the
            recipe key) and lists valid fields, instead of transformers silently storing it.
    """
    config_cls = getattr(transformers, config_class) if isinstance(config_class, str) else config_class
    valid = set(config_cls().to_dict())
    unknown = sorted(set(fields) - valid)
    if unknown:
        shown = ", ".join(sorted(k for k in valid if not k.startswith("_"))[:40])
        raise ValueError(f"{where} has key(s) {unknown} unknown to {config_cls.__name__}; valid keys include: {shown}")
    return config_cls(**fields)


def override_fields(hf_config: Any, fields: dict[str, Any], where: str) -> Any:
    """Set ``fields`` on a loaded config; unknown names raise like :func:`make_hf_config`."""
    unknown = sorted(k for k in fields if not hasattr(hf_config, k))
    if unknown:
        raise ValueError(f"{where} has key(s) {unknown} unknown to {type(hf_config).__name__}")
    for key, value in fields.items():
        setattr(hf_config, key, value)
    return hf_config


def load_safetensors(loader: Any, source: str | Path, **kwargs: Any) -> Any:
    """``loader.from_pretrained(source, use_safetensors=True, **kwargs)``: weights are read from
    safetensors only, never from a pickle (``pytorch_model.bin``) that transformers would otherwise
    fall back to.

    Raises:
        FileNotFoundError: ``source`` has no safetensors weights; the message names the folder (or hub
            id) and the pickle files found, and says how to convert a checkpoint you trust.
    """
    if not _READ_WEIGHTS.get():
        return _architecture_only(loader, source, kwargs)
    try:
        return loader.from_pretrained(source, use_safetensors=True, **kwargs)
    except OSError as exc:
        folder = Path(source)
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if not pickles and "safetensors" not in str(exc):
            raise
        found = f"it holds only pickle weights ({', '.join(pickles)})" if pickles else f"transformers says: {exc}"
        raise FileNotFoundError(
            f"{source} has no safetensors weights (model.safetensors or model.safetensors.index.json); {found}. "
            "vlmkit loads safetensors only, because unpickling a checkpoint can run code. If you trust it, convert it once: "
            f"transformers' {getattr(loader, '__name__', 'AutoModel')}.from_pretrained(PATH, use_safetensors=False)"
            ".save_pretrained(NEW_FOLDER)"
        ) from None


def _architecture_only(loader: Any, source: str | Path, kwargs: dict[str, Any]) -> Any:
    """What ``load_safetensors(loader, source, **kwargs)`` builds, from the config alone (see
    :func:`without_weights`); with ``output_loading_info`` the info reports nothing missing."""
    kwargs = dict(kwargs)
    info = kwargs.get("output_loading_info", False)
    for key in _LOAD_ONLY_KWARGS:
        kwargs.pop(key, None)
    config = kwargs.pop("config", None)
    if config is None:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=kwargs.get("trust_remote_code", False))
    if hasattr(loader, "from_config"):  # an Auto class
        model = loader.from_config(config, **kwargs)
    else:
        kwargs.pop("trust_remote_code", None)
        model = loader._from_config(config, **kwargs)
    _untie_as_checkpoint(model, source, config)
    model.eval()  # as from_pretrained returns it
    return (model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}) if info else model


def _untie_as_checkpoint(model: Any, source: str | Path, config: Any) -> None:
    """Give ``model`` an output head of its own where ``from_pretrained`` would load one: transformers 5
    ties the output head to the input embeddings as the architecture declares, except when the checkpoint
    holds both tensors with different values (Flan-T5's ``lm_head.weight``). From the tensor names alone
    (a local folder's headers, or a hub checkpoint's cached index), both present means untied; a
    checkpoint that stores equal copies of both is the exception the caller's structure check catches."""
    try:
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # no embeddings (a vision tower)
        return
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return
    aliases = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    names = _checkpoint_names(source)
    if head_name is None or f"{head_name}.weight" not in names or not any(a in names for a in aliases if a != f"{head_name}.weight"):
        return
    head.weight = torch.nn.Parameter(torch.empty_like(embeddings.weight), requires_grad=embeddings.weight.requires_grad)


def _checkpoint_names(source: str | Path) -> set[str]:
    """Tensor names of a local checkpoint folder, or of a hub checkpoint whose files are in the local
    cache (empty when they are not: nothing is downloaded)."""
    if Path(source).is_dir():
        return checkpoint_tensor_names(Path(source))
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors.index.json", "model.safetensors"):
        try:
            path = try_to_load_from_cache(str(source), filename)
        except ValueError:  # not a repository id
            return set()
        if isinstance(path, str):
            return checkpoint_tensor_names(Path(path).parent)
    return set()


def checkpoint_tensor_names(folder: Path) -> set[str]:
    """Names of the tensors in a local checkpoint's safetensors files (read from the index or the
    files' headers), without loading any tensor."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    names: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            names |= set(json.loads(f.read(size))) - {"__metadata__"}
    return names
