"""Shipped YAML recipes. ``recipe_path`` resolves a recipe name or a YAML file path."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).parent


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """The YAML file for a shipped recipe name, or ``name_or_path`` itself if it is a file.

    Raises:
        ConfigError: neither a shipped recipe nor an existing file (lists the shipped ones).
    """
    from vlmkit.config import ConfigError

    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"no recipe {name_or_path!r}: not a file and not a shipped recipe; shipped: {', '.join(list_recipes())}")


def recipe_description(name: str) -> str:
    """The ``description`` line of a shipped recipe."""
    import yaml

    return str(yaml.safe_load(recipe_path(name).read_text()).get("description", ""))
