"""easy-VQA evaluation: exact match of the normalised one-word answer on a held-out split."""

from __future__ import annotations

import re
from collections import Counter

from vlmkit.data.easyvqa import COLORS, SHAPES, load_questions
from vlmkit.evaluation.runner import EvalItem, predict
from vlmkit.inference.pipeline import GenerationSettings, VLMPipeline

_NEGATION = re.compile(r"\b(not|no)\b")


def normalize(text: str) -> str:
    """Lower-case, trim, drop a trailing period / punctuation ("Yes." -> "yes")."""
    return text.strip().lower().rstrip(".!?,;:").strip()


def question_type(question: str, answer: str) -> str:
    """A coarse type for the per-type breakdown: what-colour, what-shape, yes/no colour or shape (negated or not)."""
    if answer in COLORS:
        return "what color"
    if answer in SHAPES:
        return "what shape"
    about = "color" if any(c in question.split() or f"{c}?" in question for c in COLORS) else "shape"
    return f"yes/no {about}" + (" negated" if _NEGATION.search(question) else "")


def easyvqa_items(split: str = "test", limit: int | None = None) -> list[EvalItem]:
    """Every question of the split as a single-turn item."""
    questions = load_questions(split)
    if limit:
        questions = questions[:limit]
    return [
        EvalItem(id=f"{split}-{k}", prompt=q.text, images=(q.image_path,), answers=(q.answer,), meta={"image_id": q.image_id})
        for k, q in enumerate(questions)
    ]


def score_easyvqa(items: list[EvalItem], predictions: list[str]) -> dict:
    """Accuracy overall and per question type, plus the majority-answer baseline."""
    correct = [normalize(p) == normalize(it.answers[0]) for it, p in zip(items, predictions)]
    totals, hits = Counter(), Counter()
    for it, ok in zip(items, correct):
        kind = question_type(it.prompt, it.answers[0])
        totals[kind] += 1
        hits[kind] += ok
    majority = Counter(it.answers[0] for it in items).most_common(1)[0]
    return {
        "accuracy": sum(correct) / max(len(items), 1),
        "correct": sum(correct),
        "total": len(items),
        "per_type": {k: round(hits[k] / totals[k], 4) for k in sorted(totals)},
        "majority_answer": majority[0],
        "majority_baseline": majority[1] / max(len(items), 1),
    }


def evaluate_easyvqa(
    pipeline: VLMPipeline, split: str = "test", batch_size: int = 64, limit: int | None = None,
    max_new_tokens: int = 8, progress: bool = True,
) -> tuple[dict, list[str], list[EvalItem]]:
    """Answer every question of ``split`` greedily and score it. Returns (scores, predictions, items)."""
    items = easyvqa_items(split, limit)
    predictions = predict(pipeline, items, batch_size, GenerationSettings(max_new_tokens=max_new_tokens), progress, f"easy-VQA {split}")
    return score_easyvqa(items, predictions), predictions, items
