"""easy-VQA (PyPI ``easy-vqa``, MIT): 64x64 images of one coloured shape, 13 one-word answers.

Two kinds of samples, train and test splits kept apart (they use disjoint image sets):

* ``captions`` (stage 1): a caption per image, " blue circle" (or " circle blue", or both), derived from the image's
  questions: what-questions give the colour/shape directly, yes/no questions (with their negation)
  name a present or absent colour/shape, and elimination fills in the rest. An image whose colour or
  shape stays unknown gets no caption.
* ``qa`` (stage 2): the questions as conversations, grouped per image into multi-turn conversations
  of up to ``turns_per_conversation`` (LLaVA-1.5 groups VQA questions the same way).
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass

from vlmkit.config import DataConfig
from vlmkit.data.sources import SOURCES, DataError, Sample, SourceResult
from vlmkit.processing.templates import Message

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
log = logging.getLogger("vlmkit")
_NEGATION = re.compile(r"\b(not|no)\b")


@dataclass(frozen=True)
class Question:
    """One easy-VQA question about image ``image_id``."""

    text: str
    answer: str
    image_id: int
    image_path: str


def _package():
    try:
        import easy_vqa
    except ImportError:
        raise DataError("the easy-VQA data needs the 'easy-vqa' package: pip install easy-vqa==1.0") from None
    return easy_vqa


def load_questions(split: str) -> list[Question]:
    """All questions of ``split`` (train: 38,575 on 4,000 images; test: 9,673 on 1,000 images).

    Raises:
        DataError: unknown split or the package is missing.
    """
    ev = _package()
    readers = {"train": (ev.get_train_questions, ev.get_train_image_paths), "test": (ev.get_test_questions, ev.get_test_image_paths)}
    if split not in readers:
        raise DataError(f"easy-VQA split {split!r} does not exist; valid: {', '.join(readers)}")
    get_q, get_paths = readers[split]
    texts, answers, image_ids = get_q()
    paths = get_paths()
    return [Question(t, a, i, paths[i]) for t, a, i in zip(texts, answers, image_ids)]


def derive_facts(questions: list[Question]) -> dict[int, dict[str, str]]:
    """``{image_id: {"color": ..., "shape": ...}}`` with whatever each image's questions reveal."""
    facts: dict[int, dict[str, str]] = defaultdict(dict)
    absent: dict[int, dict[str, set[str]]] = defaultdict(lambda: {"color": set(), "shape": set()})
    for q in questions:
        words = q.text.rstrip("?").split()
        colors = [w for w in words if w in COLORS]
        shapes = [w for w in words if w in SHAPES]
        f = facts[q.image_id]
        if q.answer in SHAPES:
            f["shape"] = q.answer
            if colors:
                f["color"] = colors[0]
        elif q.answer in COLORS:
            f["color"] = q.answer
            if shapes:
                f["shape"] = shapes[0]
        else:
            present = (q.answer == "yes") != bool(_NEGATION.search(q.text))
            for kind, named in (("color", colors), ("shape", shapes)):
                if named:
                    if present:
                        f[kind] = named[0]
                    else:
                        absent[q.image_id][kind].add(named[0])
    for image_id, gone in absent.items():
        for kind, options in (("color", COLORS), ("shape", SHAPES)):
            left = set(options) - gone[kind]
            if kind not in facts[image_id] and len(left) == 1:
                facts[image_id][kind] = left.pop()
    return dict(facts)


CAPTION_ORDERS = {"color-shape": (("color", "shape"),), "shape-color": (("shape", "color"),),
                  "both": (("color", "shape"), ("shape", "color"))}


def captions_for(facts: dict[str, str], order: str = "color-shape") -> list[str]:
    """" blue circle" (and/or " circle blue", by ``order``) when both colour and shape are known,
    else no caption.

    Details that decide whether a small model trained from scratch learns shape at all:

    * Terse: the first caption token is predicted right at the visual token, which gives the tower
      a direct gradient for that attribute. With a filler word first ("a blue circle") the tower
      only learns through attention from later positions and shape stays at chance (measured:
      stage-1 loss stuck at ln(3)/4, shape 33%).
    * Colour first: shape is then learned through the attention from the colour word's position,
      after a plateau at the shape-at-chance loss whose length depends on the seed (NOTES.md,
      issue 11). ``both`` (each attribute first in one of two captions) gives shape the direct
      gradient too, but measured lower test accuracy on shape (96-97% vs 98.6-99%).
    * The leading space: byte-level BPE tells "blue" (start of text) from " blue" (after a space).
      The questions name colours and shapes mid-sentence (" blue", " circle"), so the caption uses
      those same tokens; what stage 1 binds to the image is then what the yes/no questions ask
      about (without it, "is there a blue shape?" stayed at the 88% "no" prior).

    Partial captions are not produced: images with one fact missing (about 10%) still appear in
    the stage-2 questions, and a caption with a generic word in place of a fact teaches nothing.
    """
    if not (facts.get("color") and facts.get("shape")):
        return []
    return [" " + " ".join(facts[k] for k in kinds) for kinds in CAPTION_ORDERS[order]]


CAPTION_PROMPT = "Describe the image briefly."


@SOURCES.register("easyvqa")
def load_easyvqa(cfg: DataConfig) -> SourceResult:
    """Caption or QA samples of one easy-VQA split (see module docstring)."""
    questions = load_questions(cfg.split)
    result = SourceResult([])
    if cfg.kind == "captions":
        facts = derive_facts(questions)
        uncaptioned = 0
        paths = {q.image_id: q.image_path for q in questions}
        for image_id in sorted(paths):
            captions = captions_for(facts.get(image_id, {}), cfg.caption_order)
            uncaptioned += not captions
            for k, caption in enumerate(captions):
                origin = f"easy-VQA {cfg.split} image {image_id}" + (f" caption {k}" if len(captions) > 1 else "")
                messages = [Message("user", f"<image>\n{CAPTION_PROMPT}"), Message("assistant", caption)]
                result.samples.append(Sample(messages, [paths[image_id]], origin, {"image_id": image_id}))
        log.info("easy-VQA %s captions: %d captions of %d images; %d without a derivable colour and shape get none",
                 cfg.split, len(result.samples), len(paths) - uncaptioned, uncaptioned)
    else:
        by_image: dict[int, list[Question]] = defaultdict(list)
        for q in questions:
            by_image[q.image_id].append(q)
        rng = random.Random(f"easyvqa-{cfg.split}")
        for image_id in sorted(by_image):
            qs = by_image[image_id][:]
            if cfg.turns_per_conversation > 1:
                rng.shuffle(qs)
            for start in range(0, len(qs), cfg.turns_per_conversation):
                chunk = qs[start : start + cfg.turns_per_conversation]
                messages = []
                for k, q in enumerate(chunk):
                    messages.append(Message("user", f"<image>\n{q.text}" if k == 0 else q.text))
                    messages.append(Message("assistant", q.answer))
                origin = f"easy-VQA {cfg.split} image {image_id} questions {start}-{start + len(chunk) - 1}"
                result.samples.append(Sample(messages, [chunk[0].image_path], origin, {"image_id": image_id}))
    if cfg.limit:
        result.samples = result.samples[: cfg.limit]
    return result
