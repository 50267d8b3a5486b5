"""Batched prediction: prompts with images -> generated answers, in input order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from vlmkit.inference.pipeline import GenerationSettings, VLMPipeline


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
) -> list[str]:
    """Generated answers for ``items`` (greedy by default), batch by batch with left padding."""
    settings = settings or GenerationSettings(max_new_tokens=16)
    predictions: list[str] = []
    with tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            predictions += pipeline.generate([it.prompt for it in chunk], [list(it.images) for it in chunk], settings)
            bar.update(len(chunk))
    return predictions
