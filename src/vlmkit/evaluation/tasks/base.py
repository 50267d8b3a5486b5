"""What a benchmark is: a :class:`TaskSpec` (files, loader, prompt suffix, scorer) in the :data:`TASKS` registry.

A loader reads a benchmark's official local files into :class:`~vlmkit.evaluation.runner.EvalItem`
lists (prompt = question + the suffix LLaVA-1.5 uses); a scorer turns items + predictions into a
scores dict. Every problem with the files raises :class:`EvalDataError` naming the file, the row or
question id and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.evaluation.runner import EvalItem
from vlmkit.registry import Registry

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


class EvalDataError(ValueError):
    """Evaluation input is missing or malformed; the message names the file, row / id and field."""


@dataclass(frozen=True)
class TaskData:
    """Where one task's files are: a data folder plus per-file overrides (``--data task.role=PATH``).

    Args:
        task: the task name (for messages).
        root: the data folder (``None`` for tasks with built-in data).
        overrides: role -> path given explicitly.
        split: a split name for tasks that have several (easy-VQA).
        cache_dir: a folder the loader may write to (decoded MMBench images).
    """

    task: str
    root: Path | None = None
    overrides: dict[str, Path] = field(default_factory=dict)
    split: str | None = None
    cache_dir: Path | None = None

    def path(self, role: str, default: str, kind: str = "file") -> Path:
        """The path of file/folder ``role`` (an override, else ``root/default``).

        Raises:
            EvalDataError: it does not exist (or is not a ``kind``); the message says how to set it.
        """
        if role in self.overrides:
            path = Path(self.overrides[role])
        elif self.root is None:
            raise EvalDataError(f"{self.task}: no data folder given; pass --data {self.task}=PATH")
        else:
            path = self.root / default
        ok = path.exists() if kind == "any" else path.is_dir() if kind == "dir" else path.is_file()
        if not ok:
            what = {"dir": "folder", "file": "file"}.get(kind, "file or folder")
            raise EvalDataError(
                f"{self.task}: {role} {what} {path} does not exist "
                f"(set it with --data {self.task}.{role}=PATH)"
            )
        return path

    def given(self, role: str) -> Path | None:
        """The path of optional file ``role`` when given with ``--data TASK.ROLE=PATH``, else None
        (optional files are never looked for in the data folder).

        Raises:
            EvalDataError: it was given but is not a file.
        """
        if role not in self.overrides:
            return None
        path = Path(self.overrides[role])
        if not path.is_file():
            raise EvalDataError(f"{self.task}: {role} file {path} does not exist (given with --data {self.task}.{role}=PATH)")
        return path


@dataclass
class ScoreContext:
    """What a scorer may need beyond items and predictions: the task's output folder, a judge client."""

    work_dir: Path
    judge: Any = None
    progress: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark.

    Args:
        name: registry id (``vlmkit eval --task NAME``).
        title: display name.
        files: role -> (default path relative to the data folder, what it is); the first role is the
            "main file" (``--data`` may point at it directly).
        optional: roles of ``files`` used only when given with ``--data TASK.ROLE=PATH``.
        load: ``(TaskData) -> list[EvalItem]``.
        score: ``(items, predictions, ScoreContext) -> dict``.
        metric: the headline key of the scores dict.
        report: the keys shown in ``results.md`` (dotted paths into the scores dict).
        percent: scores are fractions shown as percentages (not MME's summed scores).
        prompt_suffix: the instruction appended to every question (the loaders read it from here).
        max_new_tokens: default generation length.
        needs_data: False for tasks with built-in data (easy-VQA).
        needs_judge: scoring calls an LLM judge (MM-Vet).
    """

    name: str
    title: str
    files: dict[str, tuple[str, str]]
    load: Callable[[TaskData], list[EvalItem]]
    score: Callable[[list[EvalItem], list[str], ScoreContext], dict]
    metric: str
    report: tuple[str, ...] = ()
    percent: bool = True
    prompt_suffix: str = ""
    max_new_tokens: int = 16
    needs_data: bool = True
    needs_judge: bool = False
    optional: tuple[str, ...] = ()

    @property
    def main_role(self) -> str | None:
        return next(iter(self.files), None)


TASKS: Registry[TaskSpec] = Registry("evaluation task")


def register(spec: TaskSpec) -> TaskSpec:
    TASKS.register(spec.name, spec)
    return spec


# ---------------------------------------------------------------------------------------------
# helpers shared by the loaders

def with_suffix(question: str, suffix: str) -> str:
    """``question`` + newline + ``suffix`` (LLaVA-1.5's layout); the question is stripped first."""
    question = question.strip()
    return f"{question}\n{suffix}" if suffix else question


def read_text(path: Path) -> str:
    """A task file as text: UTF-8, a byte-order mark allowed.

    Raises:
        EvalDataError: not UTF-8, naming the file and the byte offset.
    """
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def read_json(path: Path, kind: type | None = None) -> Any:
    """Parse a JSON file, checking the top level is a ``kind`` (dict / list) when given.

    Raises:
        EvalDataError: not JSON, or the wrong top-level type; the message names the file.
    """
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}: not valid JSON ({exc})") from None
    if kind is not None and not isinstance(data, kind):
        what = {dict: "an object", list: "a list"}.get(kind, kind.__name__)
        raise EvalDataError(f"{path}: expected {what} at the top level, got {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """``(line number, parsed row)`` for every non-empty line; a bad line raises naming file and line."""
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path}, line {n}: not valid JSON ({exc})") from None
    return rows


def need(row: Any, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """``row[key]`` checked to be a ``kind``.

    Raises:
        EvalDataError: ``row`` is not an object, lacks ``key`` or has the wrong type; ``where`` names
            the file and the row / question id.
    """
    if not isinstance(row, dict):
        raise EvalDataError(f"{where}: expected an object, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise EvalDataError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EvalDataError(f"{where}: field {key!r} must be {names}, got {value!r:.80}")
    return value


def need_list(row: Any, key: str, where: str, of: type | tuple[type, ...] = str) -> list:
    """``row[key]`` checked to be a non-empty list of ``of``."""
    value = need(row, key, where, list)
    if not value or not all(isinstance(v, of) for v in value):
        raise EvalDataError(f"{where}: field {key!r} must be a non-empty list of {getattr(of, '__name__', of)}")
    return value


def image_file(folder: Path, name: str, where: str) -> str:
    """``folder/name`` as a string, checked to exist."""
    path = folder / name
    if not path.is_file():
        raise EvalDataError(f"{where}: image {path} does not exist")
    return str(path)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def group_indices(items: list[EvalItem], key: str, missing: str | None = None) -> dict[str, list[int]]:
    """``{meta[key]: [item positions]}`` sorted by value, for per-type / per-split breakdowns; items
    with an empty or absent value go under ``missing`` (left out when it is ``None``)."""
    groups: dict[str, list[int]] = {}
    for k, it in enumerate(items):
        value = it.meta.get(key) or missing
        if value is not None:
            groups.setdefault(value, []).append(k)
    return dict(sorted(groups.items()))


# ---------------------------------------------------------------------------------------------
# --data arguments

def resolve_data(values: list[str], tasks: list[str], split: str | None = None) -> dict[str, TaskData]:
    """Turn ``--data`` values into one :class:`TaskData` per task (in ``tasks`` order).

    Forms: ``TASK=PATH`` (the task's data folder, or its main file, the first in its file table,
    whose folder then holds the rest), ``TASK.ROLE=PATH`` (one file or folder), and with a single
    task also a bare ``PATH`` and ``ROLE=PATH``.

    Raises:
        RegistryError: an unknown task.
        EvalDataError: a bare PATH with several tasks, a task not among ``tasks``, an unknown role,
            a path that does not exist, or a task that needs data and got none.
    """
    specs = {TASKS.get(t).name: TASKS.get(t) for t in tasks}
    roots: dict[str, Path] = {}
    overrides: dict[str, dict[str, Path]] = {name: {} for name in specs}
    only = next(iter(specs)) if len(specs) == 1 else None
    for value in values:
        key, sep, rest = value.partition("=")
        task, _, role = key.partition(".")
        if sep and task.lower() in specs:
            task, path = task.lower(), Path(rest)
        elif sep and only and key in specs[only].files:
            task, role, path = only, key, Path(rest)
        elif sep and task.lower() in TASKS:
            raise EvalDataError(f"--data {value}: task {task!r} is not among the tasks of this call ({', '.join(specs)})")
        elif only:
            task, role, path = only, "", Path(value)
        else:
            raise EvalDataError(f"--data {value}: with several tasks write TASK=PATH (tasks: {', '.join(specs)})")
        spec = specs[task]
        if not path.exists():
            raise EvalDataError(f"--data {value}: {path} does not exist")
        if role:
            if role not in spec.files:
                raise EvalDataError(f"--data {value}: {task} has no file {role!r}; valid: {', '.join(spec.files) or '(none)'}")
            overrides[task][role] = path
        elif path.is_file() and spec.main_role:
            overrides[task].setdefault(spec.main_role, path)
            roots[task] = path.parent
        else:
            roots[task] = path
    data = {}
    for name, spec in specs.items():
        if spec.needs_data and name not in roots and not overrides[name]:
            files = ", ".join(f"{role}: {default}" for role, (default, _) in spec.files.items() if role not in spec.optional)
            raise EvalDataError(f"task {name} needs its data: --data {name}=FOLDER ({files})")
        data[name] = TaskData(name, roots.get(name), overrides[name], split)
    return data


# ---------------------------------------------------------------------------------------------
# a recipe's eval section

def eval_task_data(cfg: Any) -> tuple[TaskSpec, TaskData]:
    """The task and data of a recipe's ``eval`` section (:class:`vlmkit.config.EvalConfig`), checked
    without parsing the files: the task exists and is scored without a judge, every path given exists,
    and every file the task needs is present.

    Raises:
        ConfigError: naming ``eval.task``, ``eval.data`` or ``eval.files`` and what would be valid.
    """
    from vlmkit.config import ConfigError

    if cfg.task not in TASKS:
        raise ConfigError(f"eval.task={cfg.task!r} is not an evaluation task; valid: {', '.join(TASKS.names())}")
    spec = TASKS.get(cfg.task)
    if spec.needs_judge:
        raise ConfigError(f"eval.task={spec.name} is scored by an LLM judge; evaluate it after training with "
                          f"`vlmkit eval --task {spec.name} --judge-url URL --judge-model NAME`")
    unknown = sorted(set(cfg.files) - set(spec.files))
    if unknown:
        raise ConfigError(f"eval.files has unknown role(s) {', '.join(unknown)} for task {spec.name}; "
                          f"valid: {', '.join(spec.files) or '(none: the task has built-in data)'}")
    try:
        data = resolve_data(cfg.data_arguments(), [spec.name], cfg.split)[spec.name]
        for role, (default, _) in spec.files.items():
            if role not in spec.optional and not data.path(role, default, "any").exists():
                raise EvalDataError(f"{spec.name}: {role} {default} is missing")
    except EvalDataError as exc:
        raise ConfigError(f"eval section: {_recipe_terms(str(exc))}") from None
    return spec, data


def _recipe_terms(message: str) -> str:
    """A ``--data`` message in a recipe's words (``eval.data`` / ``eval.files.ROLE``)."""
    import re

    message = re.sub(r"--data (\w+)\.(\w+)=PATH", r"eval.files.\2=PATH", message)
    return re.sub(r"--data (\w+)=(PATH|FOLDER)", r"eval.data=\2", message)
