"""Multiple choice answered with a letter: ScienceQA (IMG subset) and MMBench (circular evaluation)."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import sys
from pathlib import Path

from vlmkit.evaluation.runner import EvalItem
from vlmkit.evaluation.tasks.base import (
    LETTER_ANSWER, EvalDataError, ScoreContext, TaskData, TaskSpec, group_indices, image_file, need, need_list, read_json,
    read_text, register,
)

LETTERS = "ABCDEFGHIJ"


def choice_prompt(question: str, options: list[str], context: str = "", suffix: str = LETTER_ANSWER) -> str:
    """LLaVA-1.5's multiple-choice layout: context line, question, ``A. option`` lines, the letter instruction."""
    lines = [context] if context else []
    lines.append(question.strip())
    lines += [f"{LETTERS[k]}. {opt}" for k, opt in enumerate(options)]
    lines.append(suffix)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def load_scienceqa(data: TaskData) -> list[EvalItem]:
    """ScienceQA ``problems.json`` + ``pid_splits.json``; only problems with an image (the IMG subset
    LLaVA reports). Images are ``images/<split>/<pid>/image.png``."""
    problems_path = data.path("problems", SCIENCEQA.files["problems"][0])
    splits_path = data.path("splits", SCIENCEQA.files["splits"][0])
    images = data.path("images", SCIENCEQA.files["images"][0], "dir")
    split = data.split or "test"
    problems = read_json(problems_path, dict)
    splits = read_json(splits_path, dict)
    if split not in splits:
        raise EvalDataError(f"{splits_path}: no split {split!r}; valid: {', '.join(splits)}")
    items = []
    for pid in splits[split]:
        pid = str(pid)
        if pid not in problems:
            raise EvalDataError(f"{splits_path}: problem {pid} (split {split!r}) is not in {problems_path}")
        row = problems[pid]
        where = f"{problems_path}, problem {pid}"
        if not isinstance(row, dict):
            raise EvalDataError(f"{where}: expected an object, got {type(row).__name__}")
        if not row.get("image"):
            continue  # a text-only problem: not in the IMG subset
        image = need(row, "image", where)
        choices = need_list(row, "choices", where)
        answer = need(row, "answer", where, int)
        if not 0 <= answer < len(choices) or len(choices) > len(LETTERS):
            raise EvalDataError(f"{where}: field 'answer' is {answer}, not an index into its {len(choices)} choices")
        question = need(row, "question", where)
        hint = (row.get("hint") or "").strip()
        prompt = choice_prompt(question, choices, f"Context: {hint}" if hint else "", SCIENCEQA.prompt_suffix)
        items.append(EvalItem(pid, prompt, (image_file(images / split / pid, image, where),), (LETTERS[answer],),
                              {"answer_index": answer, "num_choices": len(choices), "subject": row.get("subject", "")}))
    return items


def score_scienceqa(items: list[EvalItem], predictions: list[str], ctx: ScoreContext | None = None) -> dict:
    """Accuracy of the predicted letter, overall and per subject."""
    from vlmkit.evaluation.metrics import scienceqa_accuracy

    def acc(ks: list[int]) -> float:
        return scienceqa_accuracy([predictions[k] for k in ks], [items[k].meta["answer_index"] for k in ks],
                                  [items[k].meta["num_choices"] for k in ks])

    return {"accuracy": acc(list(range(len(items)))), "total": len(items),
            "per_subject": {s: round(acc(ks), 4) for s, ks in group_indices(items, "subject", missing="-").items()}}


# ---------------------------------------------------------------------------------------------
def _is_empty(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() in ("nan", "none")


def _image_suffix(raw: bytes) -> str:
    return ".png" if raw.startswith(b"\x89PNG") else ".jpg"


def _read_tsv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed the 128 KiB default
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter="\t")
    missing = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in (reader.fieldnames or [])]
    if missing:
        raise EvalDataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(reader.fieldnames or [])})"
                            + ("; the test split has no answers, use the dev split" if missing == ["answer"] else ""))
    return list(reader)


def load_mmbench(data: TaskData) -> list[EvalItem]:
    """MMBench TSV (index, question, hint, A-D, answer, category, l2-category, image as base64).

    Circular evaluation as VLMEvalKit: a question with n options becomes n items; rotation k shows
    the options shifted by k (``options[k:] + options[:k]``) and the answer letter moves with its
    option. Item ids are ``<index>-<k>``; all rotations share ``meta["group"] = index``. Images are
    decoded once into ``data.cache_dir``.
    """
    path = data.path("tsv", MMBENCH.files["tsv"][0])
    if data.cache_dir is None:
        raise EvalDataError("mmbench: the loader needs a cache folder for its decoded images")
    data.cache_dir.mkdir(parents=True, exist_ok=True)
    rows = _read_tsv(path)
    by_index = {r["index"]: r for r in rows}
    items = []
    for n, row in enumerate(rows, 2):  # line 1 is the header
        index = row["index"]
        where = f"{path}, row {n} (index {index})"
        if not index or not index.strip().lstrip("-").isdigit():
            raise EvalDataError(f"{path}, row {n}: field 'index' must be an integer, got {index!r}")
        if int(index) >= 1_000_000 and str(int(index) % 1_000_000) in by_index:
            continue  # an old TSV's own circular copy; rotations are generated below
        options = []
        for letter in "ABCD":
            if _is_empty(row.get(letter)):
                break
            options.append(row[letter].strip())
        answer = (row.get("answer") or "").strip()
        if len(options) < 2:
            raise EvalDataError(f"{where}: needs at least options A and B")
        if answer not in LETTERS[: len(options)]:
            raise EvalDataError(f"{where}: field 'answer' must be one of {', '.join(LETTERS[:len(options)])}, got {answer!r}")
        image = _decode_image(row, by_index, data.cache_dir, where)
        hint = "" if _is_empty(row.get("hint")) else row["hint"].strip()
        question = row["question"].strip()
        if not question:
            raise EvalDataError(f"{where}: field 'question' is empty")
        a = LETTERS.index(answer)
        for k in range(len(options)):
            rotated = options[k:] + options[:k]
            items.append(EvalItem(
                f"{index}-{k}", choice_prompt(question, rotated, hint, MMBENCH.prompt_suffix), (image,), (LETTERS[(a - k) % len(options)],),
                {"group": index, "category": row.get("category") or "-",
                 "options": {LETTERS[j]: o for j, o in enumerate(rotated)}},
            ))
    return items


def _decode_image(row: dict[str, str], by_index: dict[str, dict], cache: Path, where: str) -> str:
    value = (row.get("image") or "").strip()
    if value in by_index and value != row["index"]:  # VLMEvalKit TSVs point repeated images at another row's index
        value = (by_index[value].get("image") or "").strip()
    for suffix in (".png", ".jpg"):
        if (cache / f"{row['index']}{suffix}").is_file():
            return str(cache / f"{row['index']}{suffix}")
    try:
        raw = base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) < 8:
        raise EvalDataError(f"{where}: field 'image' is not a base64-encoded image")
    target = cache / f"{row['index']}{_image_suffix(raw)}"
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(raw)
    tmp.replace(target)
    return str(target)


def score_mmbench(items: list[EvalItem], predictions: list[str], ctx: ScoreContext | None = None) -> dict:
    """Circular accuracy: a question counts only when every rotation is answered right; overall and per category."""
    from vlmkit.evaluation.metrics import mmbench_circular

    records = [{"index": it.id, "group": it.meta["group"], "category": it.meta["category"], "options": it.meta["options"],
                "answer": it.answers[0], "prediction": p} for it, p in zip(items, predictions)]
    return {**mmbench_circular(records), "total": len(items)}


SCIENCEQA = register(TaskSpec(
    name="scienceqa", title="ScienceQA-IMG",
    files={"problems": ("problems.json", "pid -> {question, choices, answer, hint, image, ...}"),
           "splits": ("pid_splits.json", "{split: [pid, ...]}"),
           "images": ("images", "<split>/<pid>/image.png")},
    load=load_scienceqa, score=score_scienceqa, metric="accuracy", report=("accuracy",), prompt_suffix=LETTER_ANSWER,
    max_new_tokens=8,
))
MMBENCH = register(TaskSpec(
    name="mmbench", title="MMBench (circular)",
    files={"tsv": ("mmbench_dev_20230712.tsv", "TSV with base64 images (the dev split has answers)")},
    load=load_mmbench, score=score_mmbench, metric="overall", report=("overall",), prompt_suffix=LETTER_ANSWER,
    max_new_tokens=8,
))
