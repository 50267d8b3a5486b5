"""Benchmarks as data: one :class:`TaskSpec` per benchmark in the :data:`TASKS` registry.

``vlmkit eval --task NAME``; ``TASKS.get(name)`` gives the spec (files, loader, prompt suffix, scorer).
"""

from vlmkit.evaluation.tasks.base import TASKS, EvalDataError, ScoreContext, TaskData, TaskSpec
from vlmkit.evaluation.tasks import caption, choice, easyvqa, mmvet, vqa, yesno  # noqa: F401  (registers the tasks)

__all__ = ["TASKS", "EvalDataError", "ScoreContext", "TaskData", "TaskSpec"]
