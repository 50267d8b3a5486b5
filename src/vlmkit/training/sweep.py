"""Design-space sweeps (MM1 / prismatic style): train every combination of a few config choices.

A grid is a list of axes, each ``key=value1,value2``::

    vlmkit sweep easyvqa-tiny --grid connector=linear,mlp2x_gelu --grid merge=1,2

``key`` is an alias from :data:`GRID_ALIASES` or any dotted config key (``stages.instruct.epochs``).
Values are parsed like command-line overrides (YAML: ``32`` is an int, ``1e-3`` a float). The variants
are the cartesian product of the axes, the first axis outermost. Each variant is an ordinary run in
``<output_dir>/<variant name>`` (so it resumes); a variant whose folder already holds the same config,
a saved model and ``eval.json`` is not run again. The sweep folder gets::

    sweep.json, sweep.csv     one row per variant: visual tokens, parameters, train seconds, accuracy
    sweep.png                 accuracy against visual tokens per image

Connector options belong to a connector type. A variant whose connector type differs from the
recipe's (after the command-line overrides) starts from that type's defaults: the recipe's
``model.connector.options`` and ``model.connector.pretrained`` are dropped, so the tiny recipe's
``merge: 2`` reaches neither ``qformer`` nor ``linear``. Options written on the command line or in the
grid (``merge=2``, ``model.connector.options.num_queries=16``) always apply, whatever the type.

Before the first variant trains, every variant's model is built with the real builder
(:func:`vlmkit.models.build.build_model`) on the meta device: no weights, no data, a fraction of a
second for a from-scratch model. Every variant that fails (a bad key, an option its connector does not
take, a token grid its connector cannot pool) is reported at once, each naming the variant.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmkit.config import ConfigError, ModelConfig, RecipeConfig, load_recipe, parse_override, to_dict
from vlmkit.registry import RegistryError

log = logging.getLogger("vlmkit")

GRID_ALIASES: dict[str, tuple[str, ...]] = {
    "connector": ("model.connector.type",),
    "image_size": ("model.vision.image_size",),
    "merge": ("model.connector.options.merge",),
    "feature_layer": ("model.vision.feature_layer",),
    "encoder": ("model.vision.encoder",),
    "lr": ("stages.*.lr",),
    "seed": ("train.seed",),
}
"""Short grid keys -> the dotted config keys they set. ``stages.*`` means every stage of the recipe, so
``lr=1e-3`` sets the peak learning rate of each stage to that value (one stage: ``stages.NAME.lr``)."""

CONNECTOR_RESET = ("model.connector.options={}", "model.connector.pretrained=null")
"""Overrides applied first (before the command line and the grid) to a variant that changes the connector type."""

PROBE_TEXTS = ("What shape is in the image?", "circle", "What color is the shape?", "blue")
"""Text a from-scratch tokenizer is trained on when a variant is only built to check it: the structure
does not depend on which merges the tokenizer learns (the run trains it on the recipe's data)."""

PROBE_ANSWERS = ("yes", "no")
"""Answer vocabulary for checking an encoder-only variant whose run builds it from the training data."""

RESULT_FILES = ("sweep.json", "sweep.csv", "sweep.png")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


@dataclass(frozen=True)
class GridAxis:
    """One axis of a sweep: the key as written (alias or dotted), its raw values, the dotted keys it sets."""

    name: str
    values: tuple[str, ...]
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Variant:
    """One point of the grid: ``settings`` pairs (axis name, raw value) in axis order."""

    settings: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        """``connector=linear,merge=2``: the label in tables and charts."""
        return ",".join(f"{k}={v}" for k, v in self.settings)

    @property
    def folder_name(self) -> str:
        """:attr:`name` with characters outside ``[A-Za-z0-9._=,+-]`` replaced by ``_``."""
        return _UNSAFE.sub("_", self.name)


@dataclass
class SweepResult:
    """What a sweep produced: one row per variant (see :func:`collect_row`) and the files written."""

    output_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# the grid

def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and braces, so YAML values such as ``[1,2]`` stay whole."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_grid(specs: list[str]) -> list[GridAxis]:
    """Parse ``--grid`` arguments; each holds one or more whitespace-separated ``key=v1,v2,...``.

    Raises:
        ConfigError: an item without ``=``, an empty key or value, or a key given twice.
    """
    axes: list[GridAxis] = []
    for spec in specs:
        for item in spec.split():
            if "=" not in item:
                raise ConfigError(f"--grid {item!r} must look like key=value1,value2 (e.g. connector=linear,mlp2x_gelu); "
                                  f"keys: {', '.join(GRID_ALIASES)} or a dotted config key")
            name, raw = (s.strip() for s in item.split("=", 1))
            values = _split_values(raw)
            if not name or not all(values):
                raise ConfigError(f"--grid {item!r} has an empty key or value")
            if name in {a.name for a in axes}:
                raise ConfigError(f"--grid key {name!r} is given twice; list all its values once: {name}=a,b")
            axes.append(GridAxis(name, tuple(values), GRID_ALIASES.get(name, (name,))))
    if not axes:
        raise ConfigError("a sweep needs at least one --grid key=value1,value2")
    return axes


def expand_grid(axes: list[GridAxis]) -> list[Variant]:
    """The cartesian product of the axes, first axis outermost (the last one varies fastest)."""
    return [Variant(tuple(zip((a.name for a in axes), combo))) for combo in itertools.product(*(a.values for a in axes))]


def _concrete_keys(axis: GridAxis, stage_names: list[str]) -> list[str]:
    keys = []
    for key in axis.keys:
        parts = key.split(".")
        if "*" not in parts:
            keys.append(key)
        elif parts[0] == "stages" and parts[1] == "*" and "*" not in parts[2:]:
            keys += [".".join(["stages", name, *parts[2:]]) for name in stage_names]
        else:
            raise ConfigError(f"--grid {axis.name}: '*' is only valid as the stage in stages.*.KEY, not in {key!r}")
    return keys


def variant_overrides(variant: Variant, axes: list[GridAxis], stage_names: list[str]) -> list[str]:
    """The dotted ``key=value`` overrides that make ``variant`` (aliases resolved, ``stages.*`` expanded)."""
    by_name = {a.name: a for a in axes}
    return [f"{key}={value}" for name, value in variant.settings for key in _concrete_keys(by_name[name], stage_names)]


def variant_config(recipe: str | Path, base: RecipeConfig, overrides: list[str], changes: list[str],
                   folder: str | Path) -> RecipeConfig:
    """The resolved config of one variant: the recipe, then ``overrides``, then the variant's ``changes``,
    running in ``folder``.

    When the variant's connector type differs from ``base``'s (the recipe with ``overrides``), the
    recipe's connector options and pretrained connector weights are dropped first (see
    :data:`CONNECTOR_RESET`): they were written for the other type. Options that ``overrides`` or
    ``changes`` set still apply.

    Raises:
        ConfigError: a key or value the config rejects.
    """
    tail = [*overrides, *changes, f"train.output_dir={folder}"]
    config = load_recipe(recipe, tail)
    if config.model.connector.type != base.model.connector.type:
        config = load_recipe(recipe, [*CONNECTOR_RESET, *tail])
    return config


def probe_model(cfg: ModelConfig) -> int:
    """Build ``cfg``'s model with the real builder, without weights; return its visual tokens per image.

    The build runs on the meta device, so it runs every check of
    :func:`vlmkit.models.build.build_model` (registry ids, Hugging Face config keys, the tower's token
    grid, connector options, the connector's shape probe) at almost no cost. transformers refuses
    ``from_pretrained`` on the meta device, so a config with pretrained weights is built on the CPU
    instead (as the run itself would build it). A from-scratch tokenizer is trained on
    :data:`PROBE_TEXTS`; an encoder-only model without ``answers`` gets :data:`PROBE_ANSWERS`.

    Raises:
        Exception: whatever the builder raises for this config (``ValueError`` for its checks).
    """
    import torch

    from vlmkit.fileio import quiet_hf_progress
    from vlmkit.models.build import backbone_spec, build_model

    cfg = copy.deepcopy(cfg)
    # (resolving the backbone also converts a GGUF source to its cached folder, on a real device)
    if not cfg.answers and backbone_spec(cfg).kind == "encoder":
        cfg.answers = list(PROBE_ANSWERS)
    with quiet_hf_progress():
        try:
            with torch.device("meta"):
                model, _ = build_model(cfg, tokenizer_texts=PROBE_TEXTS)
        except RuntimeError:  # from_pretrained on meta, or an op without a meta kernel: the real build decides
            model, _ = build_model(cfg, tokenizer_texts=PROBE_TEXTS)
    return model.num_image_tokens


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, (ValueError, RegistryError)) else f"{type(exc).__name__}: {exc}"


def plan_sweep(recipe: str | Path, specs: list[str], overrides: list[str], output_dir: str | Path | None = None
               ) -> tuple[Path, list[tuple[Variant, RecipeConfig]]]:
    """Resolve every variant's config and build its model (see :func:`probe_model`) before anything trains.

    Connector options follow the rule of :func:`variant_config`. Returns the sweep folder (default
    ``runs/<recipe name>-sweep``) and ``(variant, config)`` pairs, each config's ``train.output_dir`` set
    to the variant's subfolder. Nothing is written.

    Raises:
        ConfigError: bad grid syntax; a recipe without an ``eval`` section (accuracy is what a sweep
            compares); a grid over ``train.output_dir``; two variants with one folder name; or, listing
            every failing variant at once (one line each, ``--grid <variant>: <error>``): a grid key or
            value the config rejects, an unknown connector, vision encoder or language backbone, a
            variant whose model cannot be built.
    """
    axes = parse_grid(specs)
    base = load_recipe(recipe, overrides)
    if base.eval is None:
        raise ConfigError(f"recipe {recipe!r} has no eval section; a sweep compares eval accuracy. "
                          "Add an `eval:` section or the override eval.task=easyvqa")
    stage_names = [s.name for s in base.stages]
    out = Path(output_dir) if output_dir else Path("runs") / f"{base.name}-sweep"
    variants = expand_grid(axes)
    resolved, folders, problems, bad_config = [], set(), [], False
    for variant in variants:
        changes = variant_overrides(variant, axes, stage_names)
        if any(parse_override(c)[0] == ["train", "output_dir"] for c in changes):
            raise ConfigError("--grid may not set train.output_dir; each variant runs in <output-dir>/<variant>")
        if variant.folder_name in folders:
            raise ConfigError(f"--grid variants share the folder name {variant.folder_name!r}; use values that differ "
                              "in letters, digits or ._=,+-")
        folders.add(variant.folder_name)
        try:
            config = variant_config(recipe, base, overrides, changes, out / variant.folder_name)
            _check_registered(config)
        except (ConfigError, RegistryError) as exc:
            problems.append(f"--grid {variant.name}: {_describe(exc)}")
            bad_config = True
            continue
        resolved.append((variant, config))
    planned = []
    for variant, config in resolved:
        try:
            tokens = probe_model(config.model)
        except Exception as exc:  # noqa: BLE001  (any build failure is this variant's, reported with the others)
            problems.append(f"--grid {variant.name}: the model cannot be built: {_describe(exc)}")
            continue
        log.info("sweep variant %s: builds, %d visual tokens per image", variant.name, tokens)
        planned.append((variant, config))
    if problems:
        hint = (f"\n(grid aliases: {', '.join(GRID_ALIASES)}; any dotted config key works too)" if bad_config else "")
        raise ConfigError(f"{len(problems)} of {len(variants)} sweep variants fail before training; nothing was trained:\n  "
                          + "\n  ".join(problems) + hint)
    return out, planned


def _check_registered(config: RecipeConfig) -> None:
    """Fail before any variant trains when one names an unknown connector, tower or backbone (``auto``
    is resolved when the variant's model is built)."""
    from vlmkit.models.connectors import CONNECTORS
    from vlmkit.models.language import BACKBONES
    from vlmkit.models.vision import VISION_TOWERS
    from vlmkit.registry import is_auto

    CONNECTORS.get(config.model.connector.type)
    if not is_auto(config.model.vision.encoder):
        VISION_TOWERS.get(config.model.vision.encoder)
    if not is_auto(config.model.language.backbone):
        BACKBONES.get(config.model.language.backbone)


# ---------------------------------------------------------------------------------------------
# running and collecting

def is_finished(config: RecipeConfig) -> bool:
    """Whether ``config``'s run folder holds this exact config, a saved model and ``eval.json``."""
    out = Path(config.train.output_dir)
    saved = out / "config.yaml"
    return ((out / "eval.json").is_file() and (out / "model" / "vlmkit_config.json").is_file()
            and saved.is_file() and yaml.safe_load(saved.read_text()) == to_dict(config))


def count_saved_parameters(model_dir: str | Path) -> int:
    """Floating-point values stored in a model folder's safetensors files, read from their headers only
    (no weights are loaded). Equals the model's parameter count, plus any stored normalisation
    statistics (BatchNorm running mean and variance of conv towers)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).rglob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():
                piece = fh.get_slice(name)
                if piece.get_dtype().startswith(("F", "BF")):
                    total += math.prod(piece.get_shape())
    return total


def collect_row(variant: Variant, folder: str | Path, reused: bool) -> dict[str, Any]:
    """A result row read from a finished variant's run folder.

    Keys: variant, settings (axis -> YAML-parsed value), visual_tokens (per image), parameters,
    train_seconds (sum over stages), accuracy, correct, total, folder, reused (not trained this time).

    Raises:
        ValueError: ``eval.json`` holds no ``accuracy``.
    """
    folder = Path(folder)
    scores = json.loads((folder / "eval.json").read_text())
    if "accuracy" not in scores:
        raise ValueError(f"{folder / 'eval.json'} has no 'accuracy' score (it has: {', '.join(scores)}); "
                         "a sweep compares accuracy")
    saved = json.loads((folder / "model" / "vlmkit_config.json").read_text())
    stages = [json.loads(p.read_text()) for p in sorted((folder / "stages").glob("*/stage.json"))]
    return {
        "variant": variant.name,
        "settings": {k: yaml.safe_load(v) for k, v in variant.settings},
        "visual_tokens": int(saved["num_image_tokens"]),
        "parameters": count_saved_parameters(folder / "model"),
        "train_seconds": round(sum(s.get("seconds", 0.0) for s in stages), 1),
        "accuracy": scores["accuracy"],
        "correct": scores.get("correct"),
        "total": scores.get("total"),
        "folder": str(folder),
        "reused": reused,
    }


def run_sweep(recipe: str | Path, specs: list[str], overrides: list[str] | None = None,
              output_dir: str | Path | None = None) -> SweepResult:
    """Train (or reuse) every variant in grid order, then write ``sweep.json``, ``sweep.csv``, ``sweep.png``.

    Each variant trains through :func:`vlmkit.training.run.run_training`. The result files are rewritten
    after each variant, so an interrupted sweep keeps what finished.

    Raises:
        ConfigError: see :func:`plan_sweep`; also a variant folder holding a run of a different config.
    """
    from vlmkit.training import run

    out, planned = plan_sweep(recipe, specs, overrides or [], output_dir)
    result = SweepResult(out)
    for index, (variant, config) in enumerate(planned, 1):
        folder = Path(config.train.output_dir)
        reused = is_finished(config)
        if reused:
            log.info("sweep variant %d/%d %s: finished earlier, reading %s", index, len(planned), variant.name, folder)
        else:
            log.info("sweep variant %d/%d %s: training in %s", index, len(planned), variant.name, folder)
            run.run_training(config)
        result.rows.append(collect_row(variant, folder, reused))
        result.files = write_results(result.rows, out, title=f"{config.name}: {config.eval.task} {config.eval.split} accuracy")
    return result


# ---------------------------------------------------------------------------------------------
# output

TABLE_HEADER = ("variant", "visual tokens", "parameters", "train time", "accuracy")


def table_rows(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Rows formatted for printing under :data:`TABLE_HEADER`."""
    return [(r["variant"] + (" (reused)" if r["reused"] else ""), str(r["visual_tokens"]), f"{r['parameters']:,}",
             f"{r['train_seconds']:.0f} s", f"{100 * r['accuracy']:.2f}%") for r in rows]


def write_results(rows: list[dict[str, Any]], out: str | Path, title: str = "sweep") -> dict[str, Path]:
    """Write ``sweep.json``, ``sweep.csv`` (settings flattened into one column per axis) and ``sweep.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in RESULT_FILES}
    paths["sweep.json"].write_text(json.dumps(rows, indent=2))
    axes = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    columns = ["variant", *axes, "visual_tokens", "parameters", "train_seconds", "accuracy", "correct", "total", "folder", "reused"]
    with paths["sweep.csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: v for k, v in r.items() if k != "settings"}, **r["settings"]})
    plot_accuracy(rows, paths["sweep.png"], title)
    return paths


def plot_accuracy(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Accuracy (%) against visual tokens per image, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tokens = [r["visual_tokens"] for r in rows]
    accuracy = [100 * r["accuracy"] for r in rows]
    ax.scatter(tokens, accuracy, color="tab:blue", zorder=3)
    for r, x, y in zip(rows, tokens, accuracy):
        ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if min(tokens) > 0 and max(tokens) >= 8 * min(tokens):  # 576 vs 36 tokens: evenly spaced on log2
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(sorted(set(tokens)), [str(t) for t in sorted(set(tokens))])
    ax.margins(x=0.2, y=0.12)
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
