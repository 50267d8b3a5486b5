"""easy-VQA as a task: the questions ship in the ``easy-vqa`` package, so no ``--data`` is needed."""

from __future__ import annotations

from vlmkit.evaluation.easyvqa import easyvqa_items, score_easyvqa
from vlmkit.evaluation.runner import EvalItem
from vlmkit.evaluation.tasks.base import ScoreContext, TaskData, TaskSpec, register


def load_easyvqa(data: TaskData) -> list[EvalItem]:
    """Every question of ``data.split`` (default ``test``), asked as is (the demo model is trained on the bare questions)."""
    return easyvqa_items(data.split or "test")


def _score(items: list[EvalItem], predictions: list[str], ctx: ScoreContext | None = None) -> dict:
    return score_easyvqa(items, predictions)


EASYVQA = register(TaskSpec(
    name="easyvqa", title="easy-VQA", files={}, load=load_easyvqa, score=_score, metric="accuracy",
    report=("accuracy", "majority_baseline"), max_new_tokens=8, needs_data=False,
))
