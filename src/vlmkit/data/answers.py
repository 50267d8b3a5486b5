"""The answer vocabulary of discriminative (encoder-only) models: VQA as classification."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from vlmkit.data.sources import Sample


def answer_vocabulary(samples: Iterable[Sample], min_count: int = 1) -> list[str]:
    """The distinct final assistant replies (stripped) seen at least ``min_count`` times, most
    frequent first, ties in alphabetical order (so the order is deterministic).

    Raises:
        ValueError: no reply qualifies.
    """
    counts = Counter(s.messages[-1].content.strip() for s in samples if s.messages and s.messages[-1].role == "assistant")
    answers = sorted((a for a, n in counts.items() if n >= min_count and a), key=lambda a: (-counts[a], a))
    if not answers:
        raise ValueError(f"no answer occurs at least {min_count} time(s) in the training data; cannot build model.answers")
    return answers
