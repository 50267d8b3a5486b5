"""Checkpoint formats: read any of them, write the ones a model fits.

``load_any(path)`` detects the format of a folder (vlmkit, hf-llava, hf-blip2, llava-original) and
reads it; ``export_model(model, processor, config, FORMAT, DST)`` refuses, before writing anything,
what the format cannot express (naming the part and the formats that can hold it), then writes into
a temporary folder renamed onto ``DST`` only when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmkit.config import ModelConfig
from vlmkit.fileio import atomic_directory
from vlmkit.formats import hf_blip2, hf_llava, llava_original, vlmkit  # noqa: F401  (each registers its format)
from vlmkit.formats.base import FORMATS, FormatError, LoadedModel, ModelFormat, Problem, ReadOptions

__all__ = ["FORMATS", "FormatError", "LoadedModel", "ModelFormat", "Problem", "ReadOptions", "detect_format",
           "export_model", "load_any", "load_model", "save_model", "unsupported_parts"]


def detect_format(folder: str | Path) -> str:
    """The id of the format ``folder`` is in.

    Raises:
        FileNotFoundError: no such folder.
        FormatError: no format recognises it (lists what each looks for).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    for name, fmt in FORMATS.items():
        if fmt.detect(folder):
            return name
    looked = "; ".join(f"{name}: {fmt.looks_for}" for name, fmt in FORMATS.items())
    raise FormatError(f"{folder} is not a model folder of a known layout (looked for {looked})")


def load_any(path: str | Path, dtype: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Read a model folder of any registered format (detected from its files)."""
    folder = Path(path)
    fmt = FORMATS.get(detect_format(folder))
    return fmt.read(folder, ReadOptions(dtype=dtype, allow_pickle=allow_pickle))


def load_model(folder: str | Path, dtype: str | None = None, allow_pickle: bool = False) -> tuple[Any, Any]:
    """``(model, processor)`` of a folder in any format (see :func:`load_any`)."""
    loaded = load_any(folder, dtype, allow_pickle)
    return loaded.model, loaded.processor


def unsupported_parts(model: Any, processor: Any, config: ModelConfig, fmt: str) -> list[str]:
    """One line per part ``fmt`` cannot express, each naming the formats that can hold that part."""
    problems = FORMATS.get(fmt).unsupported(model, processor, config)
    lines = []
    for p in problems:
        able = [name for name, other in FORMATS.items() if other.writable and name != fmt
                and not any(q.part == p.part for q in other.unsupported(model, processor, config))]
        lines.append(f"{p.part}: {p.reason} (formats that can hold it: {', '.join(able) or 'none'})")
    return lines


def export_model(model: Any, processor: Any, config: ModelConfig, fmt: str, dst: str | Path, overwrite: bool = False) -> Path:
    """Write the model in format ``fmt`` to ``dst``: complete, or not at all.

    Raises:
        RegistryError: unknown format.
        FormatError: the format cannot express a part of the model (nothing is written), or ``dst``
            exists and ``overwrite`` is off.
    """
    writer = FORMATS.get(fmt)
    lines = unsupported_parts(model, processor, config, fmt)
    if lines:
        raise FormatError(f"{fmt} cannot express this model; nothing was written to {dst}:\n  " + "\n  ".join(lines))
    dst = Path(dst)
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FormatError(f"{dst} already exists; choose a new folder (or remove it)")
    with atomic_directory(dst) as tmp:
        writer.write(model, processor, config, tmp)
    return dst


def save_model(model: Any, processor: Any, config: ModelConfig, folder: str | Path) -> Path:
    """Write (or replace) a vlmkit model folder atomically. LoRA must be merged first.

    Raises:
        ValueError: a part still carries unmerged LoRA adapters.
    """
    from vlmkit.training.lora import has_lora

    for name, part in model.parts().items():
        if has_lora(part):
            raise ValueError(f"the {name} part has unmerged LoRA adapters; merge them before saving a full model")
    return export_model(model, processor, config, "vlmkit", folder, overwrite=True)
