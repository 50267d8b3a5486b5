"""Batched, resumable evaluation: tasks -> items -> predictions (saved per batch) -> scores -> results.md.

:func:`predict` is the one place that calls the model. :func:`prepare` reads and checks every task's
files (no model needed), :func:`evaluate` answers what is not answered yet and scores; the layout is

    <out>/<task>/predictions.jsonl   one row per answered question (resumable; see predictions.py)
    <out>/<task>/scores.json         the task's scores
    <out>/results.md                 a Markdown table of the headline scores of every task of the call

Under a launcher (``torchrun --nproc-per-node N -m vlmkit eval ...``) every process answers every
N-th unanswered question of a task, saving its answers per batch to its own
``<task>/predictions.rank<r>.jsonl``; once all have finished, the main process merges them into
``predictions.jsonl`` (question order), removes them, scores and writes the files, and every process
returns the same scores. Whatever fails on one process is raised on all of them. Without a launcher
nothing changes: one process, one predictions file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from vlmkit import distributed
from vlmkit.inference.pipeline import GenerationSettings, VLMPipeline

if TYPE_CHECKING:
    from vlmkit.evaluation.judge import JudgeClient
    from vlmkit.evaluation.predictions import PredictionLog
    from vlmkit.evaluation.tasks import TaskData, TaskSpec


@dataclass(frozen=True)
class EvalItem:
    """One question: an id, the prompt text, its image paths and reference answers."""

    id: str
    prompt: str
    images: tuple[str, ...]
    answers: tuple[str, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def predict(
    pipeline: VLMPipeline,
    items: list[EvalItem],
    batch_size: int = 32,
    settings: GenerationSettings | None = None,
    progress: bool = True,
    desc: str = "eval",
    on_batch: Callable[[list[EvalItem], list[str]], None] | None = None,
) -> list[str]:
    """Answers for ``items``: generated on the engine (greedy by default; continuous batching with
    ``batch_size`` requests decoded together, a finished question's slot refilled at the next step),
    or classified over the answer vocabulary in batches for encoder-only backbones.

    ``on_batch(items, answers)`` is called for every ``batch_size`` consecutive items once all of
    them are answered, in item order (the runner saves them there), and for the rest at the end.

    Raises:
        EvalDataError: an image is missing or cannot be decoded (answers of earlier batches are saved).
    """
    settings = settings or GenerationSettings(max_new_tokens=16)
    with tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        if isinstance(pipeline, VLMPipeline) and pipeline.generative and settings.use_cache:
            return _generate_streaming(pipeline, items, batch_size, settings, desc, on_batch, bar)
        predictions: list[str] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            answers = _guard(desc, chunk, lambda: pipeline.answer([it.prompt for it in chunk], [list(it.images) for it in chunk], settings))
            if on_batch is not None:
                on_batch(chunk, answers)
            predictions += answers
            bar.update(len(chunk))
    return predictions


def _generate_streaming(pipeline, items, batch_size, settings, desc, on_batch, bar) -> list[str]:
    """Keep up to ``2 * batch_size`` questions encoded and queued on an engine that decodes
    ``batch_size`` at a time; report finished answers in item order."""
    from vlmkit.inference.engine import Engine, SamplingParams
    from vlmkit.inference.pipeline import as_image

    engine = Engine(pipeline.model, pipeline.processor, max_batch_size=batch_size)
    params = SamplingParams.from_settings(settings)
    requests: list = []
    answers: list[str] = []
    saved = 0
    total = len(items)
    failure: Exception | None = None  # a question that cannot be encoded: answer the ones before it, save, raise
    while len(answers) < total:
        while failure is None and len(requests) < total and len(requests) - len(answers) < 2 * batch_size:
            it = items[len(requests)]
            try:
                encoded = _guard(desc, [it], lambda it=it: pipeline.processor.prompt(it.prompt, [as_image(i) for i in it.images]))
            except Exception as exc:  # noqa: BLE001 - raised below, once the earlier answers are saved
                failure, total = exc, len(requests)
                break
            requests.append(engine.add(encoded, params))
        if engine.has_work():
            engine.step()
        while len(answers) < len(requests) and requests[len(answers)].finished:
            answers.append(requests[len(answers)].completion.text)
            bar.update(1)
        while on_batch is not None and (len(answers) - saved >= batch_size or (len(answers) == total and saved < len(answers))):
            end = min(saved + batch_size, len(answers))
            on_batch(items[saved:end], answers[saved:end])
            saved = end
    if failure is not None:
        raise failure
    return answers


def _guard(desc: str, chunk: list[EvalItem], call: Callable[[], Any]) -> Any:
    """``call()``; a bad image stops the run naming the question.

    Raises:
        EvalDataError: an image is missing or cannot be decoded.
    """
    from vlmkit.evaluation.tasks.base import EvalDataError
    from vlmkit.processing.image import ImageError

    try:
        return call()
    except ImageError as exc:
        bad = next((it for it in chunk if any(str(p) in str(exc) for p in it.images)), None)
        raise EvalDataError(f"{desc}: question {bad.id!r}: {exc}" if bad else f"{desc}: {exc}") from None


# ---------------------------------------------------------------------------------------------
@dataclass
class EvalOptions:
    """How to run: batch size, how many questions per task, generation length, progress bars, the judge.

    ``limit`` keeps the first N questions of each task (for MMBench the first N questions with all
    their rotations); ``max_new_tokens`` None uses each task's default; ``model_id`` (see
    :func:`model_fingerprint`) is written with every prediction so that predictions of another
    model are never reused (None: no check).
    """

    batch_size: int = 32
    limit: int | None = None
    max_new_tokens: int | None = None
    progress: bool = True
    judge: JudgeClient | None = None
    model_id: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class TaskRun:
    """One task ready to run: its spec, its items, its output folder and what is already predicted."""

    spec: TaskSpec
    items: list[EvalItem]
    work_dir: Path
    log: PredictionLog
    done: dict[str, str]
    max_new_tokens: int

    @property
    def todo(self) -> list[EvalItem]:
        return [it for it in self.items if it.id not in self.done]


def limit_items(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """The first ``limit`` questions; items that share ``meta["group"]`` (rotations) count as one."""
    if not limit:
        return items
    kept, groups = [], set()
    for it in items:
        group = it.meta.get("group", it.id)
        if group not in groups:
            if len(groups) == limit:
                break
            groups.add(group)
        kept.append(it)
    return kept


def prepare(tasks: dict[str, TaskData], out: str | Path, options: EvalOptions) -> list[TaskRun]:
    """Read every task's files and existing predictions, before any model is loaded.

    Predictions are those of ``<task>/predictions.jsonl`` and of the rank files an interrupted
    distributed run left beside it. Under a launcher call it on every process: the main process reads
    first (it drops cut-off last lines and decodes image caches, which the others then read).

    Raises (on every process, when launched):
        RegistryError: an unknown task name (the message lists the valid ones).
        EvalDataError: a missing or malformed file (named with row / id and field), a predictions
            file of another task, model or generation length, a judged task without a judge, or
            duplicate question ids.
    """
    _join_process_group()
    first = _together(lambda: _prepare(tasks, out, options) if distributed.is_main() else None)
    rest = _together(lambda: None if distributed.is_main() else _prepare(tasks, out, options))
    return first if distributed.is_main() else rest


def _prepare(tasks: dict[str, TaskData], out: str | Path, options: EvalOptions) -> list[TaskRun]:
    from vlmkit.evaluation.predictions import PredictionLog
    from vlmkit.evaluation.tasks import TASKS, EvalDataError

    runs = []
    for name, data in tasks.items():
        spec = TASKS.get(name)
        if spec.needs_judge and options.judge is None:
            raise EvalDataError(f"{spec.name} is scored by an LLM judge: pass --judge-url URL --judge-model NAME "
                                f"(key: --judge-key or $VLMKIT_JUDGE_KEY)")
        work = Path(out) / spec.name
        if data.cache_dir is None:
            data = replace(data, cache_dir=work / "images")
        items = limit_items(spec.load(data), options.limit)
        if not items:
            raise EvalDataError(f"{spec.name}: the data holds no questions")
        seen: set[str] = set()
        for it in items:
            if it.id in seen:
                raise EvalDataError(f"{spec.name}: question id {it.id!r} occurs twice in the data; ids must be unique")
            seen.add(it.id)
        max_new_tokens = options.max_new_tokens or spec.max_new_tokens
        log = PredictionLog(work / "predictions.jsonl", spec.name, options.model_id, max_new_tokens)
        runs.append(TaskRun(spec, items, work, log, log.load_all(), max_new_tokens))
    return runs


def evaluate(pipeline: VLMPipeline, runs: Sequence[TaskRun], options: EvalOptions, out: str | Path) -> dict[str, dict]:
    """Answer each task's unanswered questions (saved per batch), score it, write scores and ``results.md``.

    Returns ``{task: scores}``. Predictions already on disk are reused, never asked again or counted twice.
    Under a launcher call it on every process (each with its own model): they share the questions,
    the main process merges, scores and writes, and all return the same scores.

    Raises:
        EvalDataError: a bad image (answers before it are saved); under a launcher on every process,
            with the message of the process that met it. Scoring errors (an unreachable judge) likewise.
    """
    _join_process_group()
    results: dict[str, dict] = {}
    for run in runs:
        results[run.spec.name] = _evaluate_task(pipeline, run, options)
    distributed.agree(lambda: write_results_md(Path(out) / "results.md", results))
    return results


def _evaluate_task(pipeline: VLMPipeline, run: TaskRun, options: EvalOptions) -> dict:
    """Answer one task's open questions (this process's share of them) and return its scores."""
    world, rank = distributed.world_size(), distributed.rank()
    # the main process's view of what is answered decides for all, after merging what an interrupted
    # distributed run left, so that the rank files written below start empty
    open_ids = set(distributed.agree(lambda: _start_task(run)))
    todo = [it for it in run.items if it.id in open_ids]
    # interleaved shares: neighbouring questions (often of similar length, or the rotations of one
    # MMBench question) go to different processes, so all finish at about the same time
    share = todo[rank::world]
    log = run.log if world == 1 else run.log.for_rank(rank)
    answered: dict[str, str] = {}

    def save(chunk: list[EvalItem], answers: list[str]) -> None:
        log.append(chunk, answers)
        answered.update((it.id, a) for it, a in zip(chunk, answers))
        run.done.update((it.id, a) for it, a in zip(chunk, answers))

    if todo:
        settings = GenerationSettings(max_new_tokens=run.max_new_tokens)
        progress = options.progress and distributed.is_main()  # one bar (the main process's share), not N interleaved
        _together(lambda: predict(pipeline, share, options.batch_size, settings, progress, run.spec.title, on_batch=save) if share else None)
        if world > 1:
            for part in distributed.gather_objects(answered):
                run.done.update(part)
    return distributed.agree(lambda: _finish_task(run, options))


def _start_task(run: TaskRun) -> list[str]:
    """(Main process.) Merge rank files left by an interrupted run; the ids of the unanswered questions."""
    if run.log.rank_files():
        run.log.merge(run.items, run.done)
    return [it.id for it in run.todo]


def _finish_task(run: TaskRun, options: EvalOptions) -> dict:
    """(Main process.) Merge this run's rank files into ``predictions.jsonl``, score, write ``scores.json``."""
    from vlmkit.evaluation.tasks import ScoreContext
    from vlmkit.fileio import write_json_atomic

    # the rows come from ``run.done`` (gathered from every process), not from rank files this process may not see
    if distributed.world_size() > 1 or run.log.rank_files():
        run.log.merge(run.items, run.done)
    predictions = [run.done[it.id] for it in run.items]
    run.work_dir.mkdir(parents=True, exist_ok=True)
    scores = run.spec.score(run.items, predictions, ScoreContext(run.work_dir, options.judge, options.progress))
    write_json_atomic(run.work_dir / "scores.json", scores)
    return scores


def discard_predictions(run: TaskRun) -> None:
    """Forget a task's saved answers (made by another model): the main process deletes its
    ``predictions.jsonl`` and rank files, every process empties ``run.done``. Call it on every process."""
    distributed.agree(run.log.remove)
    run.done.clear()


def _join_process_group() -> None:
    # launched but not yet in the process group, every process would take itself for the main one
    # and write the same files
    if distributed.launched() and not distributed.initialized():
        distributed.state()


def _together(call: Callable[[], Any]) -> Any:
    """``call()`` on every process; if it raised on any, raise on all (the failing process its own
    exception, the others one of the same type and message as the first failing rank's), so that none
    waits in a later collective for a process that stopped. Without a launcher: just ``call()``."""
    try:
        result, error = call(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every process
        result, error = None, exc
    if distributed.world_size() == 1:
        if error is not None:
            raise error
        return result
    outcomes = distributed.gather_objects(None if error is None else (type(error), str(error)))
    failed = next(((r, o) for r, o in enumerate(outcomes) if o is not None), None)
    if error is not None:
        raise error
    if failed is not None:
        source, (cls, message) = failed
        try:
            raised = cls(message)
        except Exception:  # noqa: BLE001 - an exception type that takes other arguments
            raised = RuntimeError(f"process {source}: {cls.__name__}: {message}")
        raise raised
    return result


def run_tasks(pipeline: VLMPipeline, tasks: dict[str, TaskData], out: str | Path, options: EvalOptions | None = None) -> dict[str, dict]:
    """:func:`prepare` then :func:`evaluate`: ``{task: scores}``."""
    options = options or EvalOptions()
    return evaluate(pipeline, prepare(tasks, out, options), options, out)


def model_fingerprint(folder: str | Path) -> str:
    """``<folder name>@<12 hex digits>``: a hash of the names, sizes and modification times of the
    model folder's files, so a model retrained into the same folder gets a new id."""
    import hashlib

    folder = Path(folder)
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{folder.resolve().name}@{digest.hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
def _lookup(scores: dict, dotted: str) -> Any:
    value: Any = scores
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def headline(name: str, scores: dict) -> list[tuple[str, str]]:
    """``(metric, formatted value)`` rows of a task's report keys (fractions as percentages)."""
    from vlmkit.evaluation.tasks import TASKS

    spec = TASKS.get(name)
    rows = []
    for key in spec.report or (spec.metric,):
        value = _lookup(scores, key)
        if isinstance(value, (int, float)):
            rows.append((key, f"{100 * value:.2f}" if spec.percent else f"{value:.2f}"))
    return rows


def write_results_md(path: Path, results: dict[str, dict]) -> None:
    """A Markdown table: task, metric, score (percent for fractions), number of questions."""
    from vlmkit.evaluation.tasks import TASKS

    lines = ["# Evaluation results", "", "| task | metric | score | questions |", "|---|---|---:|---:|"]
    for name, scores in results.items():
        title = TASKS.get(name).title
        for metric, value in headline(name, scores):
            questions = scores.get("questions", scores.get("total", ""))  # MMBench: questions, not rotations
            lines.append(f"| {title} (`{name}`) | {metric} | {value} | {questions} |")
    lines += ["", "Scores in percent except MME (summed subtask scores, perception max 2000, cognition max 800).", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
