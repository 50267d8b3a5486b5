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

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed

from vlmkit import distributed as dist
from vlmkit.config import ConfigError, ModelConfig, RecipeConfig, save_yaml, to_dict
from vlmkit.data import ConversationDataset, iter_texts, load_source
from vlmkit.data.answers import answer_vocabulary
from vlmkit.fileio import write_json_atomic
from vlmkit.formats import export_model, save_model
from vlmkit.models.build import backbone_spec, build_model
from vlmkit.models.hf_config import without_weights
from vlmkit.processing.templates import TEMPLATES, template_markers
from vlmkit.processing.tokenizer import load_tokenizer
from vlmkit.training.lora import merge_lora
from vlmkit.training.materialize import first_difference, has_meta, structure, take_weights_from_rank0, to_device
from vlmkit.training.stage_output import apply_stage_output, is_complete, save_stage_output
from vlmkit.training.trainer import batch_plan, train_stage

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


def merge_lora_parts(model: Any) -> None:
    """Merge LoRA adapters into their parts (what :func:`save_stage_output` does on the main process)."""
    for part in model.parts().values():
        merge_lora(part)


def _check_same_config(out: Path, recipe: RecipeConfig) -> None:
    path = out / "config.yaml"
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text())
    new = to_dict(recipe)
    if old == new:
        return
    diffs = [d for d in _diff(old, new) if not _is_run_setting(d)]
    if not diffs:
        return
    if any(is_complete(out / "stages" / s.name) for s in recipe.stages) or list((out / "stages").glob("*/checkpoints/step-*")):
        raise ConfigError(
            f"{out} holds a run of a different config (differs at: {', '.join(diffs[:8])}); resuming it would mix "
            "the two. Use another train.output_dir, or delete the folder to start over."
        )


#: settings that change how a run is executed, not what it computes: a run may resume with others
#: (another strategy or process count, another micro-batch split, other checkpoint spacing)
RUN_SETTINGS = ("train.strategy", "train.fsdp", "train.deepspeed", "train.rank0_loading", "train.threads", "train.progress", "train.log_every",
                "train.save_every", "train.keep_checkpoints")


def _is_run_setting(dotted: str) -> bool:
    parts = dotted.split(".")
    if len(parts) >= 3 and parts[0] == "stages" and parts[2] in ("micro_batch_size",):
        return True
    return any(dotted == key or dotted.startswith(key + ".") for key in RUN_SETTINGS)


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
    dist.state()  # joins the process group when a launcher (torchrun, accelerate launch) started this process
    out = Path(recipe.train.output_dir)
    dist.agree(lambda: _open_run_folder(out, recipe))
    handler = _attach_log_file(out / "train.log") if dist.is_main() else None
    try:
        # the evaluation's files are read and checked before the first step, not after the last
        eval_run = _prepare_eval(recipe, out) if evaluate and recipe.eval is not None else None
        return _run(recipe, out, only_stages, stop_after, eval_run, started)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _open_run_folder(out: Path, recipe: RecipeConfig) -> None:
    """Create (or reopen) the run folder, check it is writable and holds no other config, write
    ``config.yaml``; and check every stage's global batch divides over this launch's processes.

    Raises:
        ConfigError: another config in the folder, an unwritable folder, or a batch that does not divide.
    """
    for stage in recipe.stages:
        batch_plan(stage)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"train.output_dir={out} cannot be written ({exc.strerror or exc}); choose a writable folder") from None
    _check_same_config(out, recipe)
    save_yaml(recipe, out / "config.yaml")


def check_free_space(out: Path, model: Any, recipe: RecipeConfig) -> None:
    """Before the first step: refuse a run whose checkpoints and model folders would not fit on the
    disk of ``out`` (an estimate from the parameter count; a checkpoint holds the trainable tensors
    and two optimizer states each; ``keep_checkpoints`` + 1 exist while a new one is written).

    Raises:
        ConfigError: not enough free space (names the folder, the estimate and the free bytes).
    """
    import shutil

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = max((sum(_trained_bytes(model, name, mode, s) for name, mode in s.policy.items()) for s in recipe.stages), default=0)
    checkpoint = 3 * trainable
    needed = (recipe.train.keep_checkpoints + 1) * checkpoint + trainable * len(recipe.stages) + total * (1 + len(recipe.train.export))
    free = shutil.disk_usage(out).free
    if needed > free:
        raise ConfigError(
            f"{out} has {free / 1e9:.2f} GB free, but this run needs about {needed / 1e9:.2f} GB "
            f"({recipe.train.keep_checkpoints + 1} checkpoints of {checkpoint / 1e9:.2f} GB, stage outputs, the final model "
            f"of {total / 1e9:.2f} GB{' and its exports' if recipe.train.export else ''}); free space, lower "
            "train.keep_checkpoints, or choose another train.output_dir"
        )


def _trained_bytes(model: Any, name: str, mode: str, stage: Any) -> int:
    """Bytes of the tensors a stage trains in part ``name``: all of it (``full``), or the LoRA
    matrices of its targeted linear layers, ``r x (in + out)`` each (``lora``)."""
    part = getattr(model, name)
    if mode == "full":
        return sum(p.numel() * p.element_size() for p in part.parameters())
    if mode != "lora":
        return 0
    targets = stage.lora.target_modules or (list(part.spec.lora_targets) if name == "language" else None)
    size = 0
    for module_name, module in part.named_modules():
        if isinstance(module, torch.nn.Linear) and (not targets or module_name.rsplit(".", 1)[-1] in targets):
            size += stage.lora.r * (module.in_features + module.out_features) * module.weight.element_size()
    return size


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
    if dist.is_main():
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
    from vlmkit.evaluation.runner import discard_predictions, evaluate

    if fresh and run.done:
        discard_predictions(run)
    elif run.done:
        log.info("%s: resuming, %d of %d questions already answered in %s", run.spec.title, len(run.done), len(run.items), run.log.path)
    scores = evaluate(pipeline, [run], _eval_options(recipe), out / "eval")[run.spec.name]
    record = {"task": run.spec.name, "title": run.spec.title, "split": recipe.eval.split, "metric": run.spec.metric, **scores}
    if dist.is_main():
        write_json_atomic(out / "eval.json", record)
    return record


def _tokenizer(recipe: RecipeConfig, out: Path, sources: dict) -> Any:
    """The run's tokenizer when the recipe trains one (trained once, kept in ``out/tokenizer``), else ``None``."""
    tok_dir = out / "tokenizer"
    size = recipe.model.language.tokenizer.train_vocab_size
    if not size:
        return None

    def train_once() -> None:  # on the main process; the others then read the folder
        if tok_dir.is_dir():
            return
        from vlmkit.fileio import atomic_directory
        from vlmkit.processing.tokenizer import train_bpe_tokenizer

        texts = []
        for stage in recipe.stages:
            name = stage.data.template or recipe.model.template
            template = TEMPLATES.get(name) if name in TEMPLATES else None
            texts += iter_texts(sources[stage.name].samples, template, recipe.model.system_prompt)
        tokenizer = train_bpe_tokenizer(texts, size, template_markers(recipe.model.template))
        with atomic_directory(tok_dir) as tmp:
            tokenizer.save_pretrained(tmp)
        log.info("trained a %d-token BPE tokenizer on %d texts -> %s", len(tokenizer), len(texts), tok_dir)

    if dist.initialized():
        dist.agree(train_once)
    else:
        train_once()
    return load_tokenizer(str(tok_dir))


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


def first_model(recipe: RecipeConfig, out: Path, sources: dict) -> tuple[Any, Any, ModelConfig]:
    """:func:`initial_model` for this process: under a launcher with several processes and
    ``train.rank0_loading``, a process other than rank 0 builds the architecture on the meta device
    without reading weights (:func:`~vlmkit.models.hf_config.without_weights`); the strategy later
    gives it rank 0's (:mod:`vlmkit.training.materialize`). Collective under a launcher.

    A process whose weightless build fails, or differs from rank 0's model in a parameter's or
    buffer's name, shape, dtype or tying, reads the weights instead (with a warning naming the
    difference): the result never depends on the shortcut.
    """
    if not (recipe.train.rank0_loading and dist.world_size() > 1) or recipe.model.pretrained:
        return initial_model(recipe, out, sources)
    tokenizer = _tokenizer(recipe, out, sources)  # collective: before the builds, which are not

    def build(weights: bool) -> tuple[Any, Any, ModelConfig]:
        with contextlib.nullcontext() if weights else without_weights():
            model, processor = build_model(recipe.model, tokenizer)
        return model, processor, recipe.model

    built, fallback = None, None
    if not dist.is_main():
        try:
            built = build(weights=False)
        except Exception as exc:  # noqa: BLE001 - any failure of the shortcut falls back to the plain build
            fallback = f"building it without weights failed ({type(exc).__name__}: {exc})"
    if built is None:
        built = build(weights=True)
    mine = structure(built[0])
    reference = dist.broadcast_object(mine if dist.is_main() else None)
    if has_meta(built[0]) and mine != reference:
        fallback = f"the model built without weights differs from rank 0's ({first_difference(mine, reference)})"
        built = build(weights=True)
    # the warnings are logged where the user sees them (the main process), not only on the rank concerned
    fallbacks = [(r, why) for r, why in enumerate(dist.gather_objects(fallback)) if why]
    for r, why in fallbacks:
        log.warning("train.rank0_loading: rank %d read the weights: %s", r, why)
    log.info("train.rank0_loading: rank 0 read the weights; the other %d process(es) built the model without "
             "them and receive rank 0's when the strategy wraps it", dist.world_size() - 1 - len(fallbacks))
    return built


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


def read_run_recipe(run_dir: str | Path) -> RecipeConfig:
    """The resolved recipe a run folder was trained with (its ``config.yaml``, answers included).

    Raises:
        ConfigError: no ``config.yaml``.
    """
    from vlmkit.config import from_dict

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
    recipe = from_dict(RecipeConfig, yaml.safe_load(path.read_text()))
    if (run_dir / "answers.json").is_file():
        recipe.model.answers = json.loads((run_dir / "answers.json").read_text())
    return recipe


def restore_model(run_dir: str | Path, stage: str | None = None, before: bool = False) -> tuple[Any, Any, ModelConfig]:
    """The model of a run folder after its completed stages (up to and including ``stage``; with
    ``before``, up to the stage before it), LoRA adapters merged: what ``vlmkit export`` writes for a
    run or stage folder, and what ``vlmkit checkpoint consolidate`` starts from.

    Raises:
        ConfigError: no ``config.yaml``, an unknown stage, or ``stage`` (or no stage) complete.
    """
    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    names = [s.name for s in recipe.stages]
    if stage is not None and stage not in names:
        raise ConfigError(f"{run_dir}: unknown stage {stage!r}; stages: {', '.join(names)}")
    set_seed(recipe.train.seed)  # parts no stage trained are the run's seeded initialisation (as on resume)
    model, processor, model_cfg = initial_model(recipe, run_dir)
    applied = []
    for s in recipe.stages:
        if before and s.name == stage:
            return model.eval(), processor, model_cfg
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
        threads = dist.threads_per_process(train.threads)
        if threads < train.threads:
            log.warning("train.threads=%d x %d process(es) on this node exceed its %d CPUs: %d thread(s) per process",
                        train.threads, dist.local_world_size(), dist.node_cpus(), threads)
        torch.set_num_threads(threads)
    sources = {s.name: load_source(s.data) for s in recipe.stages}

    _ensure_answers(recipe, sources, out)
    set_seed(train.seed)
    model, processor, model_cfg = first_model(recipe, out, sources)
    to_device(model)
    check_exports(recipe, model, processor, model_cfg)
    dist.agree(lambda: check_free_space(out, model, recipe))
    log.info("model: %s tower -> %s connector (%d visual tokens per image) -> %s LM; %s parameters%s",
             model.vision.spec.name, model_cfg.connector.type, model.num_image_tokens, model.language.spec.name,
             f"{sum(p.numel() for p in model.parameters()):,}", f" (from {recipe.model.pretrained})" if recipe.model.pretrained else "")
    if dist.world_size() > 1:
        log.info("distributed: %d processes (%d per node), rank %d writes the files", dist.world_size(), dist.local_world_size(), 0)
    summary = RunSummary(out)
    stop_left = stop_after
    for index, stage in enumerate(recipe.stages):
        folder = out / "stages" / stage.name
        if is_complete(folder):
            if not has_meta(model):  # a process without weights gets the stage's from rank 0 later
                apply_stage_output(model, folder)
                to_device(model)
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
        result = train_stage(model, dataset, stage, train, folder, stop_left, stage.data.num_workers)
        model = result.model
        to_device(model)  # (FSDP hands it back in rank 0's host memory, on the meta device elsewhere)
        stop_left = None
        if dist.is_main():
            save_stage_output(model, stage.policy, folder, result)
        else:
            merge_lora_parts(model)
        dist.barrier()
        summary.stages[stage.name] = {"steps": result.steps, "final_loss": result.final_loss, "seconds": round(result.seconds, 1),
                                      "samples": result.samples, "skipped": result.skipped}
        log.info("stage %r done: %d steps, final loss %.4f, %.1f s", stage.name, result.steps, result.final_loss, result.seconds)
        if only_stages and stage.name == only_stages[-1] and stage is not recipe.stages[-1]:
            summary.seconds = time.perf_counter() - started
            return summary

    # processes without weights (built without them, or handed back so by FSDP) get rank 0's for the evaluation
    if eval_run is not None and dist.any_process(has_meta(model)):
        take_weights_from_rank0(model)
    summary.model_dir = out / "model"
    if dist.is_main():
        save_model(model, processor, model_cfg, out / "model")
        log.info("saved the model to %s", summary.model_dir)
    for fmt in train.export:
        summary.exports[fmt] = out / f"model-{fmt}"
        if dist.is_main():
            export_model(model, processor, model_cfg, fmt, out / f"model-{fmt}", overwrite=True)
            log.info("exported the model as %s to %s", fmt, summary.exports[fmt])
    dist.barrier()
    if eval_run is not None:
        from vlmkit.inference.pipeline import VLMPipeline

        trained = any(not info.get("reused") for info in summary.stages.values())
        summary.eval = _run_eval(recipe, out, VLMPipeline(model, processor), eval_run, fresh=trained)
        e = summary.eval
        log.info("%s %s %s %.4f (%s questions) -> %s", e["title"], e["split"], e["metric"], e[e["metric"]],
                 e.get("total", e.get("questions", "?")), out / "eval" / e["task"])
    summary.seconds = time.perf_counter() - started
    return summary
