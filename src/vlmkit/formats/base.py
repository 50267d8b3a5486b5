"""The checkpoint format layer: one reader and one writer per format, key renames as tables.

A format is a :class:`ModelFormat` in :data:`FORMATS`. Reading gives a :class:`LoadedModel`: the
model, its processor and the :class:`~vlmkit.config.ModelConfig` that describes it (the one
description every writer works from). Writing goes into a fresh folder that :func:`export_model`
renames onto the destination only when it is complete.

Weight names travel through :class:`KeyTable` rows ``(vlmkit prefix, format prefix)``: data per
format, not code per tensor. Loading builds the vlmkit model with empty (meta) weights and assigns
the checkpoint's tensors to it, so a 7B checkpoint is held in memory once.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import ModelConfig
from vlmkit.registry import Registry

FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


class FormatError(ValueError):
    """A checkpoint cannot be read or written in a format; the message names the file, tensor or part."""


@dataclass(frozen=True)
class Problem:
    """A part of a model that a format cannot express: ``part`` (vision, connector, fusion, language,
    processor) and what about it."""

    part: str
    reason: str


@dataclass
class LoadedModel:
    """What a reader returns: the model (eval mode), its processor, the config that describes it and
    the format it was read from."""

    model: Any
    processor: Any
    config: ModelConfig
    format: str


@dataclass(frozen=True)
class ReadOptions:
    """``dtype`` overrides the checkpoint's; ``allow_pickle`` lets readers open pickled weights with
    ``torch.load(weights_only=True)`` (never a full unpickle)."""

    dtype: str | None = None
    allow_pickle: bool = False


class ModelFormat(abc.ABC):
    """One checkpoint layout.

    Attributes:
        name: registry id (``vlmkit export --format NAME``).
        description: one line for ``vlmkit list formats``.
        looks_for: what :meth:`detect` recognises, for the error on an unknown folder.
        writable: whether :meth:`write` exists for this format.
    """

    name: str = ""
    description: str = ""
    looks_for: str = ""
    writable: bool = True

    @abc.abstractmethod
    def detect(self, folder: Path) -> bool:
        """Whether ``folder`` is in this format (cheap: reads config files only)."""

    @abc.abstractmethod
    def read(self, folder: Path, options: ReadOptions) -> LoadedModel:
        """Load the folder. Raises :class:`FormatError` naming the file or tensor at fault."""

    def unsupported(self, model: Any, processor: Any, config: ModelConfig) -> list[Problem]:
        """The parts of ``model`` this format cannot express (empty: it can be written)."""
        return [] if self.writable else [Problem("model", f"{self.name} is read-only in vlmkit")]

    def write(self, model: Any, processor: Any, config: ModelConfig, folder: Path) -> None:
        """Write the model into the empty folder ``folder`` (called only when :meth:`unsupported` is empty)."""
        raise FormatError(f"format {self.name!r} cannot be written")


FORMATS: Registry[ModelFormat] = Registry("checkpoint format")


def lora_problems(model: Any) -> list[Problem]:
    """One problem per part that still carries LoRA adapters (formats hold merged weights only)."""
    from vlmkit.training.lora import has_lora

    return [Problem(name, "unmerged LoRA adapters (merge them first)") for name, part in model.parts().items() if has_lora(part)]


# ---------------------------------------------------------------------------------------------
# key tables

@dataclass(frozen=True)
class KeyTable:
    """Rows ``(vlmkit prefix, format prefix)``, tried in order (put longer prefixes first).

    ``aliases`` are extra rows used only when reading: one format tensor that feeds two vlmkit
    tensors (BLIP-2's vision post-layernorm is both the tower's and the Q-Former's input norm).
    """

    rows: tuple[tuple[str, str], ...]
    aliases: tuple[tuple[str, str], ...] = field(default=())

    def to_format(self, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """vlmkit names -> format names (the vlmkit copies an alias made are not written twice).

        Raises:
            FormatError: a tensor no row covers (names it and ``where``).
        """
        state = {k: t for k, t in state.items() if not any(k.startswith(v) for v, _ in self.aliases)}
        return _rename(state, [(v, f) for v, f in self.rows], where, "vlmkit")

    def from_format(self, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """Format names -> vlmkit names (aliases add their copies).

        Raises:
            FormatError: a tensor no row covers (names it and ``where``).
        """
        out = _rename(state, [(f, v) for v, f in self.rows], where, "checkpoint")
        for vlmkit_prefix, format_prefix in self.aliases:
            out.update({vlmkit_prefix + k[len(format_prefix):]: t for k, t in state.items() if k.startswith(format_prefix)})
        return out


def _rename(state: dict[str, torch.Tensor], rows: list[tuple[str, str]], where: str, side: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    uncovered = []
    for key, tensor in state.items():
        for source, target in rows:
            if key.startswith(source):
                out[target + key[len(source):]] = tensor
                break
        else:
            uncovered.append(key)
    if uncovered:
        shown = ", ".join(uncovered[:6]) + (" ..." if len(uncovered) > 6 else "")
        raise FormatError(f"{where}: {len(uncovered)} {side} tensor(s) have no place in the other layout: {shown}")
    return out


# ---------------------------------------------------------------------------------------------
# assembling a model from a description and a state dict

def build_empty(config: ModelConfig, tokenizer: Any) -> tuple[Any, Any]:
    """The model and processor ``config`` describes, with parameters on the meta device (no memory,
    no random init); buffers are real. Fill it with :func:`assign_weights`."""
    from accelerate import init_empty_weights

    from vlmkit.fileio import quiet_hf_progress
    from vlmkit.models.build import build_model

    with init_empty_weights(include_buffers=False), quiet_hf_progress():
        return build_model(config, tokenizer)


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` (vlmkit names) into an empty model, taking the tensors themselves (no copy).

    Raises:
        FormatError: a tensor is missing, unexpected, of another shape, or not floating point (the
            message names the tensor and ``where``).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        raise FormatError(f"{where} does not fit the model its config describes: {'; '.join(parts)}")
    fixed = {}
    for key, tensor in state.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise FormatError(f"{where}: tensor {key} has shape {tuple(tensor.shape)}, the config implies {tuple(want.shape)}")
        if want.is_floating_point() and not tensor.is_floating_point():
            raise FormatError(f"{where}: tensor {key} has dtype {tensor.dtype}; a floating-point tensor is needed")
        target = want.dtype if want.is_floating_point() else tensor.dtype  # the skeleton was built in the wanted dtype
        fixed[key] = tensor.to(target) if tensor.dtype != target else tensor
    model.load_state_dict(fixed, strict=True, assign=True)
    language = getattr(model, "language", None)
    if language is not None and getattr(language.config, "tie_word_embeddings", False):
        language.hf_model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise FormatError(f"{where}: no weights for {', '.join(left[:6])}")
    model.eval()


def config_fields(hf_config: Any, config_class: type | None = None) -> dict[str, Any]:
    """A transformers config as the ``config`` dict of a vlmkit part (fields its class accepts,
    without bookkeeping keys), so the part rebuilds from scratch with the same architecture."""
    skip = {"model_type", "transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path", "auto_map"}
    cls = config_class or type(hf_config)
    valid = set(cls().to_dict())
    return {k: v for k, v in hf_config.to_dict().items() if k in valid and k not in skip}


# ---------------------------------------------------------------------------------------------
# file checks shared by the readers

def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        FormatError: missing, not JSON, or not an object (names the file).
    """
    if not path.is_file():
        raise FormatError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object")
    return data


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a transformers-style folder (one file, or the shards an
    ``*.safetensors.index.json`` lists).

    Raises:
        FormatError: no weights, or a shard the index names is missing (names it).
    """
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = read_json(indexes[0])
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise FormatError(f"{indexes[0]} has no weight_map")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FormatError(f"{folder}: shard(s) {', '.join(missing)} listed in {indexes[0].name} are missing")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder} has no safetensors weights (model.safetensors or an index of shards)")
    return files


def check_tensor_headers(files: Iterable[Path]) -> None:
    """Every tensor in the safetensors ``files`` is floating point (read from the headers only).

    Raises:
        FormatError: an unreadable file or an integer/bool tensor (names the file and tensor).
    """
    from safetensors import safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    dtype = fh.get_slice(key).get_dtype()
                    if dtype not in FLOAT_DTYPES:
                        raise FormatError(f"{path}: tensor {key} has dtype {dtype}; model weights must be floating point")
        except FormatError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise FormatError(f"{path} is not a readable safetensors file: {exc}") from None


def read_tensors(files: Iterable[Path], allow_pickle: bool) -> dict[str, torch.Tensor]:
    """All tensors of ``files``: safetensors directly; pickles (``.bin``/``.pt``) only with
    ``allow_pickle``, through ``torch.load(weights_only=True)`` (tensors and plain containers only,
    no code runs).

    Raises:
        FormatError: a pickle without the opt-in, or one ``weights_only`` refuses (names the file).
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            check_tensor_headers([path])
            state.update(load_file(str(path)))
            continue
        if not allow_pickle:
            raise FormatError(
                f"{path} is a Python pickle; loading one can run code. vlmkit reads it only when you opt in "
                "(--allow-pickle, or model.allow_pickle: true), and then with torch.load(weights_only=True)"
            )
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise FormatError(f"{path}: torch.load(weights_only=True) refused it: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise FormatError(f"{path} does not hold a flat mapping of tensor names to tensors")
        state.update(loaded)
    return state
