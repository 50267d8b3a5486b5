"""A training run: every stage of a recipe in order, resumable, then the final model and evaluation.

Run folder::

    config.yaml            the resolved recipe (the overrides applied)
    train.log              everything logged
    tokenizer/             a tokenizer trained for this run (models from scratch)
    stages/<name>/         metrics.jsonl, loss.png, policy.txt, checkpoints/, the stage's trained parts
    model/                 the final model (LoRA merged), loadable with ``vlmkit.load``
    eval/<task>/           the evaluation's predictions.jsonl and scores.json (see ``vlmkit eval``), results.md
    eval.json              the task evaluated and its scores, when the recipe has an ``eval`` section
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed

from vlmkit.config import ConfigError, ModelConfig, RecipeConfig, save_yaml, to_dict
from vlmkit.data import ConversationDataset, iter_texts, load_source
from vlmkit.data.answers import answer_vocabulary
from vlmkit.fileio import write_json_atomic
from vlmkit.models.build import backbone_spec, build_model
from vlmkit.formats import export_model, save_model
from vlmkit.processing.templates import TEMPLATES
from vlmkit.processing.tokenizer import load_tokenizer
from vlmkit.training.stage_output import apply_stage_output, is_complete, save_stage_output
from vlmkit.training.trainer import make_accelerator, train_stage

log = logging.getLogger("vlmkit")


@dataclass
class RunSummary:
    """What a run produced: per-stage results, the final model folder, evaluation scores."""

    output_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_dir: Path | None = None
    exports: dict[str, Path] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    seconds: float = 0.0


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.DEBUG:
        log.setLevel(logging.DEBUG)
    return handler


def _check_same_config(out: Path, recipe: RecipeConfig) -> None:
    path = out / "config.yaml"
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text())
    new = to_dict(recipe)
    if old == new:
        return
    diffs = _diff(old, new)
    if any(is_complete(out / "stages" / s.name) for s in recipe.stages) or list((out / "stages").glob("*/checkpoints/step-*")):
        raise ConfigError(
            f"{out} holds a run of a different config (differs at: {', '.join(diffs[:8])}); resuming it would mix "
            "the two. Use another train.output_dir, or delete the folder to start over."
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{prefix}.{i}")]
    return [] if a == b else [prefix or "(root)"]


def run_training(
    recipe: RecipeConfig,
    only_stages: list[str] | None = None,
    stop_after: int | None = None,
    evaluate: bool = True,
) -> RunSummary:
    """Run (or resume) a recipe. Completed stages are re-applied from disk, not retrained.

    Args:
        only_stages: train only these stages; earlier stages must already be complete.
        stop_after: stop after this many optimizer steps of the first stage that trains (tests).
        evaluate: run the recipe's ``eval`` section after the last stage.

    Raises:
        ConfigError: the run folder holds a different config, no stages, or an unknown stage name.
    """
    if not recipe.stages:
        raise ConfigError("the recipe has no stages")
    names = [s.name for s in recipe.stages]
    for name in only_stages or []:
        if name not in names:
            raise ConfigError(f"unknown stage {name!r}; stages of this recipe: {', '.join(names)}")
    started = time.perf_counter()
    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(out, recipe)
    save_yaml(recipe, out / "config.yaml")
    handler = _attach_log_file(out / "train.log")
    try:
        # the evaluation's files are read and checked before the first step, not after the last
        eval_run = _prepare_eval(recipe, out) if evaluate and recipe.eval is not None else None
        return _run(recipe, out, only_stages, stop_after, eval_run, started)
    finally:
        log.removeHandler(handler)
        handler.close()


def _ensure_answers(recipe: RecipeConfig, sources: dict, out: Path) -> None:
    """Encoder-only backbones classify answers: without ``model.answers``, build the vocabulary from
    the replies of every stage whose data is not caption data (template ``plain``; captions are
    image-text matching pairs), and keep it in ``answers.json`` so a resumed run uses the same one."""
    if recipe.model.answers or recipe.model.pretrained or backbone_spec(recipe.model).kind != "encoder":
        return
    path = out / "answers.json"
    if path.is_file():
        recipe.model.answers = json.loads(path.read_text())
        return
    samples = [s for stage in recipe.stages if stage.data.template != "plain" for s in sources[stage.name].samples]
    recipe.model.answers = answer_vocabulary(samples)
    path.write_text(json.dumps(recipe.model.answers, indent=1))
    log.info("answer vocabulary: %d answers from the training data -> %s", len(recipe.model.answers), path)


def _prepare_eval(recipe: RecipeConfig, out: Path):
    """The recipe's evaluation as a :class:`~vlmkit.evaluation.runner.TaskRun` (files parsed, questions
    loaded); predictions go to ``out/eval/<task>/``.

    Raises:
        ConfigError: an unknown task or missing data (see :func:`~vlmkit.evaluation.tasks.base.eval_task_data`).
        EvalDataError: a malformed file, named with its row and field.
    """
    from vlmkit.evaluation.runner import prepare
    from vlmkit.evaluation.tasks.base import eval_task_data

    spec, data = eval_task_data(recipe.eval)
    options = _eval_options(recipe)
    (run,) = prepare({spec.name: data}, out / "eval", options)
    return run


def _eval_options(recipe: RecipeConfig):
    from vlmkit.evaluation.runner import EvalOptions

    e = recipe.eval
    return EvalOptions(e.batch_size, e.limit, e.max_new_tokens, progress=recipe.train.progress)


def _run_eval(recipe: RecipeConfig, out: Path, pipeline, run, fresh: bool) -> dict[str, Any]:
    """Answer and score the prepared evaluation; ``fresh``: a stage trained in this call, so answers
    already on disk (an interrupted earlier evaluation) belong to another model and are dropped."""
    from vlmkit.evaluation.runner import evaluate

    if fresh and run.done:
        run.log.path.unlink()
        run.done.clear()
    elif run.done:
        log.info("%s: resuming, %d of %d questions already answered in %s", run.spec.title, len(run.done), len(run.items), run.log.path)
    scores = evaluate(pipeline, [run], _eval_options(recipe), out / "eval")[run.spec.name]
    record = {"task": run.spec.name, "title": run.spec.title, "split": recipe.eval.split, "metric": run.spec.metric, **scores}
    write_json_atomic(out / "eval.json", record)
    return record


def _tokenizer(recipe: RecipeConfig, out: Path, sources: dict) -> Any:
    """The run's tokenizer when the recipe trains one (trained once, kept in ``out/tokenizer``), else ``None``."""
    tok_dir = out / "tokenizer"
    size = recipe.model.language.tokenizer.train_vocab_size
    if not size:
        return None
    if tok_dir.is_dir():
        return load_tokenizer(str(tok_dir))
    from vlmkit.processing.tokenizer import train_bpe_tokenizer

    texts = []
    for stage in recipe.stages:
        name = stage.data.template or recipe.model.template
        template = TEMPLATES.get(name) if name in TEMPLATES else None
        texts += iter_texts(sources[stage.name].samples, template, recipe.model.system_prompt)
    tokenizer = train_bpe_tokenizer(texts, size)
    tokenizer.save_pretrained(tok_dir)
    log.info("trained a %d-token BPE tokenizer on %d texts -> %s", len(tokenizer), len(texts), tok_dir)
    return tokenizer


def initial_model(recipe: RecipeConfig, out: Path, sources: dict | None = None) -> tuple[Any, Any, ModelConfig]:
    """The model the first stage starts from, its processor and the config that describes it: a
    complete model read from ``model.pretrained`` (any format), else the one ``model`` builds.

    Raises:
        ConfigError: ``model.pretrained`` with a tokenizer to train (the folder brings its own).
    """
    if recipe.model.pretrained:
        from vlmkit.formats import load_any

        if recipe.model.language.tokenizer.train_vocab_size:
            raise ConfigError("model.pretrained brings its own tokenizer; remove model.language.tokenizer.train_vocab_size")
        loaded = load_any(recipe.model.pretrained, None, recipe.model.allow_pickle)
        loaded.model.train()
        return loaded.model, loaded.processor, loaded.config
    if sources is None:
        sources = {s.name: load_source(s.data) for s in recipe.stages} if recipe.model.language.tokenizer.train_vocab_size else {}
    model, processor = build_model(recipe.model, _tokenizer(recipe, out, sources))
    return model, processor, recipe.model


def check_exports(recipe: RecipeConfig, model: Any, processor: Any, model_cfg: ModelConfig) -> None:
    """Before the first step: every ``train.export`` format can express the model.

    Raises:
        ConfigError: names the format and the parts it cannot hold.
    """
    from vlmkit.formats import unsupported_parts

    for fmt in recipe.train.export:
        lines = [line for line in unsupported_parts(model, processor, model_cfg, fmt) if "LoRA" not in line]
        if lines:
            raise ConfigError(f"train.export: {fmt} cannot express this model:\n  " + "\n  ".join(lines))


def restore_model(run_dir: str | Path, stage: str | None = None) -> tuple[Any, Any, ModelConfig]:
    """The model of a run folder after its completed stages (up to and including ``stage``),
    LoRA adapters merged: what ``vlmkit export`` writes for a run or stage folder.

    Raises:
        ConfigError: no ``config.yaml``, an unknown stage, or ``stage`` (or no stage) complete.
    """
    from vlmkit.config import from_dict

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
    recipe = from_dict(RecipeConfig, yaml.safe_load(path.read_text()))
    names = [s.name for s in recipe.stages]
    if stage is not None and stage not in names:
        raise ConfigError(f"{run_dir}: unknown stage {stage!r}; stages: {', '.join(names)}")
    if (run_dir / "answers.json").is_file():
        recipe.model.answers = json.loads((run_dir / "answers.json").read_text())
    set_seed(recipe.train.seed)  # parts no stage trained are the run's seeded initialisation (as on resume)
    model, processor, model_cfg = initial_model(recipe, run_dir)
    applied = []
    for s in recipe.stages:
        folder = run_dir / "stages" / s.name
        if not is_complete(folder):
            break
        apply_stage_output(model, folder)
        applied.append(s.name)
        if s.name == stage:
            break
    if stage is not None and stage not in applied:
        raise ConfigError(f"{run_dir}: stage {stage!r} is not complete (complete: {', '.join(applied) or 'none'})")
    if not applied:
        raise ConfigError(f"{run_dir}: no stage is complete yet")
    return model.eval(), processor, model_cfg


def _run(recipe: RecipeConfig, out: Path, only_stages, stop_after, eval_run, started: float) -> RunSummary:
    train = recipe.train
    if train.threads:
        torch.set_num_threads(train.threads)
    accelerator = make_accelerator(train.precision)
    sources = {s.name: load_source(s.data) for s in recipe.stages}

    _ensure_answers(recipe, sources, out)
    set_seed(train.seed)
    model, processor, model_cfg = initial_model(recipe, out, sources)
    model.to(accelerator.device)
    check_exports(recipe, model, processor, model_cfg)
    log.info("model: %s tower -> %s connector (%d visual tokens per image) -> %s LM; %s parameters%s",
             model.vision.spec.name, model_cfg.connector.type, model.num_image_tokens, model.language.spec.name,
             f"{sum(p.numel() for p in model.parameters()):,}", f" (from {recipe.model.pretrained})" if recipe.model.pretrained else "")
    summary = RunSummary(out)
    stop_left = stop_after
    for index, stage in enumerate(recipe.stages):
        folder = out / "stages" / stage.name
        if is_complete(folder):
            apply_stage_output(model, folder)
            model.to(accelerator.device)
            summary.stages[stage.name] = json.loads((folder / "stage.json").read_text()) | {"reused": True}
            log.info("stage %r: already complete, loaded its outputs from %s", stage.name, folder)
            continue
        if only_stages and stage.name not in only_stages:
            raise ConfigError(
                f"stage {stage.name!r} has not been run in {out}; run it first (or include it in --stages)"
            )
        template = TEMPLATES.get(stage.data.template) if stage.data.template else None
        dataset = ConversationDataset(sources[stage.name].samples, processor, template, stage.data.skip_bad_rows,
                                      stage.data.cache_images, stage.data.augment)
        set_seed(train.seed + 1000 * (index + 1))
        log.info("stage %r: %d samples, %s", stage.name, len(dataset), stage.policy)
        result = train_stage(model, dataset, stage, train, folder, accelerator, stop_left, stage.data.num_workers)
        stop_left = None
        save_stage_output(model, stage.policy, folder, result)
        summary.stages[stage.name] = {"steps": result.steps, "final_loss": result.final_loss, "seconds": round(result.seconds, 1),
                                      "samples": result.samples, "skipped": result.skipped}
        log.info("stage %r done: %d steps, final loss %.4f, %.1f s", stage.name, result.steps, result.final_loss, result.seconds)
        if only_stages and stage.name == only_stages[-1] and stage is not recipe.stages[-1]:
            summary.seconds = time.perf_counter() - started
            return summary

    summary.model_dir = save_model(model, processor, model_cfg, out / "model")
    log.info("saved the model to %s", summary.model_dir)
    for fmt in train.export:
        summary.exports[fmt] = export_model(model, processor, model_cfg, fmt, out / f"model-{fmt}", overwrite=True)
        log.info("exported the model as %s to %s", fmt, summary.exports[fmt])
    if eval_run is not None:
        from vlmkit.inference.pipeline import VLMPipeline

        trained = any(not info.get("reused") for info in summary.stages.values())
        summary.eval = _run_eval(recipe, out, VLMPipeline(model, processor), eval_run, fresh=trained)
        e = summary.eval
        log.info("%s %s %s %.4f (%s questions) -> %s", e["title"], e["split"], e["metric"], e[e["metric"]],
                 e.get("total", e.get("questions", "?")), out / "eval" / e["task"])
    summary.seconds = time.perf_counter() - started
    return summary
