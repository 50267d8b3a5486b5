"""COCO captions on the Karpathy test split: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)."""

from __future__ import annotations

from vlmkit.evaluation.runner import EvalItem
from vlmkit.evaluation.tasks.base import (
    EvalDataError, ScoreContext, TaskData, TaskSpec, image_file, need, need_list, read_json, register,
)

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


def load_coco_caption(data: TaskData) -> list[EvalItem]:
    """``dataset_coco.json`` (Karpathy): ``images[{filepath, filename, split, sentences[{raw}], cocoid}]``;
    the ``test`` split (5,000 images) unless ``data.split`` says otherwise. Item ids are the cocoids."""
    path = data.path("karpathy", COCO_CAPTION.files["karpathy"][0])
    images = data.path("images", COCO_CAPTION.files["images"][0], "dir")
    split = data.split or "test"
    items = []
    for n, row in enumerate(need(read_json(path, dict), "images", str(path), list)):
        where = f"{path}, images[{n}]"
        if need(row, "split", where) != split:
            continue
        cocoid = need(row, "cocoid", where, (int, str))
        where = f"{path}, cocoid {cocoid}"
        refs = []
        for k, s in enumerate(need_list(row, "sentences", where, dict)):
            raw = s.get("raw")
            if not isinstance(raw, str) or not raw.strip():
                raise EvalDataError(f"{where}: sentences[{k}] has no text in 'raw'")
            refs.append(raw.strip())
        image = image_file(images / row.get("filepath", ""), need(row, "filename", where), where)
        items.append(EvalItem(str(cocoid), CAPTION_PROMPT, (image,), tuple(refs)))
    if not items:
        raise EvalDataError(f"{path}: no images in split {split!r}")
    return items


def score_coco_caption(items: list[EvalItem], predictions: list[str], ctx: ScoreContext | None = None) -> dict:
    from vlmkit.evaluation.metrics import caption_scores

    scores = caption_scores({it.id: p for it, p in zip(items, predictions)}, {it.id: list(it.answers) for it in items})
    return {**scores, "total": len(items)}


COCO_CAPTION = register(TaskSpec(
    name="coco_caption", title="COCO Captions (Karpathy test)",
    files={"karpathy": ("dataset_coco.json", "Karpathy split JSON"),
           "images": (".", "folder holding each image's <filepath>/<filename> (val2014/...)")},
    load=load_coco_caption, score=score_coco_caption, metric="CIDEr", report=("CIDEr", "BLEU-4", "METEOR", "ROUGE-L"),
    prompt_suffix=CAPTION_PROMPT, max_new_tokens=48,
))
