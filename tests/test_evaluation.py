"""easy-VQA scoring: normalisation, question types, the majority baseline, batched prediction order."""

from __future__ import annotations

import pytest

from vlmkit.evaluation.easyvqa import normalize, question_type, score_easyvqa
from vlmkit.evaluation.runner import EvalItem, predict


def items(*pairs):
    return [EvalItem(f"q{i}", q, ("img.png",), (a,)) for i, (q, a) in enumerate(pairs)]


@pytest.mark.parametrize("raw, clean", [("Yes.", "yes"), ("  Circle ", "circle"), ("no!", "no"), ("blue,", "blue")])
def test_normalize(raw, clean):
    assert normalize(raw) == clean


@pytest.mark.parametrize(
    "question, answer, kind",
    [
        ("what color is the shape?", "blue", "what color"),
        ("what is the blue shape?", "circle", "what shape"),
        ("is there a red shape?", "yes", "yes/no color"),
        ("does the image not contain a gray shape?", "no", "yes/no color negated"),
        ("is there a triangle?", "no", "yes/no shape"),
        ("is no circle present?", "yes", "yes/no shape negated"),
    ],
)
def test_question_types(question, answer, kind):
    assert question_type(question, answer) == kind


def test_scores_exact_match_per_type_and_majority():
    qs = items(("what color is it?", "red"), ("is there a circle?", "yes"), ("is there a red shape?", "yes"), ("what shape?", "triangle"))
    perfect = score_easyvqa(qs, ["Red.", "yes", "Yes", "triangle"])
    assert perfect["accuracy"] == 1.0 and perfect["correct"] == 4
    always_yes = score_easyvqa(qs, ["yes"] * 4)
    assert always_yes["accuracy"] == always_yes["majority_baseline"] == 0.5 and always_yes["majority_answer"] == "yes"
    assert always_yes["per_type"] == {"what color": 0.0, "what shape": 0.0, "yes/no color": 1.0, "yes/no shape": 1.0}
    assert score_easyvqa(qs, ["red circle", "yes", "no", "triangle"])["accuracy"] == 0.5  # extra words are wrong


class EchoPipeline:
    """Answers each prompt with its own text, recording batch sizes."""

    def __init__(self):
        self.batches = []

    def answer(self, prompts, images, settings):
        self.batches.append(len(prompts))
        return [p.upper() for p in prompts]


def test_predict_keeps_order_across_batches():
    qs = items(*[(f"question {i}", "x") for i in range(10)])
    pipe = EchoPipeline()
    assert predict(pipe, qs, batch_size=4, progress=False) == [f"QUESTION {i}" for i in range(10)]
    assert pipe.batches == [4, 4, 2]
