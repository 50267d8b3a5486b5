"""Shipped YAML recipes. ``recipe_path`` resolves a recipe name or a YAML file path."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).parent


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _shipped_or_file(name_or_path: str, folder: Path, suffix: str) -> Path | None:
    """``name_or_path`` itself when it is a file, else the shipped ``folder/NAME{suffix}``, else ``None``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = folder / f"{name_or_path}{suffix}"
    return shipped if shipped.is_file() else None


def recipe_path(name_or_path: str) -> Path:
    """The YAML file for a shipped recipe name, or ``name_or_path`` itself if it is a file.

    Raises:
        ConfigError: neither a shipped recipe nor an existing file (lists the shipped ones).
    """
    from vlmkit.config import ConfigError

    found = _shipped_or_file(name_or_path, RECIPES_DIR, ".yaml")
    if found is None:
        raise ConfigError(f"no recipe {name_or_path!r}: not a file and not a shipped recipe; shipped: {', '.join(list_recipes())}")
    return found


def recipe_description(name: str) -> str:
    """The ``description`` line of a shipped recipe."""
    import yaml

    return str(yaml.safe_load(recipe_path(name).read_text()).get("description", ""))


DEEPSPEED_DIR = RECIPES_DIR / "deepspeed"


def list_deepspeed_configs() -> list[str]:
    """Names of the shipped DeepSpeed configs (``train.deepspeed``)."""
    return sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))


def deepspeed_config_path(name_or_path: str) -> Path:
    """The JSON file of a shipped DeepSpeed config name (``zero2``, ``zero3`` ...) or a file path.

    Raises:
        ConfigError: neither (lists the shipped ones).
    """
    from vlmkit.config import ConfigError

    found = _shipped_or_file(name_or_path, DEEPSPEED_DIR, ".json")
    if found is None:
        raise ConfigError(f"train.deepspeed={name_or_path!r} is neither a shipped DeepSpeed config nor a file; "
                          f"shipped: {', '.join(list_deepspeed_configs())}")
    return found
