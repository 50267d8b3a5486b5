"""Parameter counts per part of a recipe's model, remembered between runs (``vlmkit list recipes``).

Counting is exact: the recipe's model is built on the meta device (:func:`.skeleton.build_meta_model`),
which costs the torch and transformers imports (about 5 s) and about 0.3 s per 7B model. The counts
are kept in ``parameter_counts.json`` in the user's cache folder (``$VLMKIT_CACHE``, else
``$XDG_CACHE_HOME/vlmkit``, else ``~/.cache/vlmkit``), keyed by a hash of everything they follow from
(:func:`~vlmkit.planning.architectures.sizing_description`: the model section and the shapes of its
pretrained sources) and of the transformers and vlmkit versions, so a lookup imports neither torch
nor transformers. The file is replaced atomically; a file that cannot be read or holds something else
is ignored and rewritten; a cache folder that cannot be written only costs the recount next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from vlmkit.config import ModelConfig

CACHE_FILE = "parameter_counts.json"
#: bumped when what is counted changes, so older entries are not used
FORMAT = 1
#: entries kept (the oldest go first)
MAX_ENTRIES = 512
PARTS = ("vision", "connector", "fusion", "language")


def cache_dir() -> Path:
    """The user's vlmkit cache folder: ``$VLMKIT_CACHE``, else ``$XDG_CACHE_HOME/vlmkit``, else
    ``~/.cache/vlmkit`` (not created here)."""
    if os.environ.get("VLMKIT_CACHE"):
        return Path(os.environ["VLMKIT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vlmkit"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def cache_key(cfg: ModelConfig) -> str:
    """The hex SHA-256 that names ``cfg``'s counts in the cache.

    Raises:
        ConfigError: a pretrained source that cannot be sized offline.
    """
    from vlmkit import __version__
    from vlmkit.planning.architectures import sizing_description

    data = {"format": FORMAT, "transformers": _version("transformers"), "vlmkit": __version__,
            "description": sizing_description(cfg)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def parameter_counts(cfg: ModelConfig, cache: bool = True) -> dict[str, int]:
    """Parameters per part (``vision``, ``connector``, ``fusion``, ``language``) of the model ``cfg``
    builds, counted on the meta device without downloading anything, or read from the cache (see the
    module docstring) when this configuration was counted before. ``cache=False`` counts afresh and
    leaves the cache alone.

    Raises:
        ConfigError: a pretrained source that cannot be sized offline (a whole saved model included).
        ValueError, RegistryError: what the builder raises for a bad model section.
    """
    if not cache:
        return _count(cfg)
    key = cache_key(cfg)
    path = cache_dir() / CACHE_FILE
    entries = _read(path)
    counts = entries.get(key)
    if counts is None:
        counts = _count(cfg)
        entries = _read(path)  # what other processes added meanwhile
        entries.pop(key, None)
        entries[key] = counts
        _write(path, dict(list(entries.items())[-MAX_ENTRIES:]))
    return dict(counts)


def _count(cfg: ModelConfig) -> dict[str, int]:
    from vlmkit.planning.skeleton import build_meta_model, count_parts

    model, _ = build_meta_model(cfg)
    return count_parts(model)


def _valid(counts: Any) -> bool:
    return (isinstance(counts, dict) and set(counts) == set(PARTS)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()))


def _read(path: Path) -> dict[str, dict[str, int]]:
    """The cache's entries; empty when the file is missing, unreadable or not a cache of this format
    (entries that are not counts are dropped)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(k, str) and _valid(v)}


def _write(path: Path, entries: dict[str, dict[str, int]]) -> None:
    """Replace the cache file atomically (a temporary file in the same folder, then a rename); a folder
    that cannot be written is left as it is."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "entries": entries}, f)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
