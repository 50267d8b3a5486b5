"""Does an exported model answer as vlmkit does, when transformers runs it?

Exports a vlmkit model (a model folder, or a run folder) to the transformers LLaVA layout, loads the
export with transformers alone (``AutoProcessor`` + ``apply_chat_template`` + ``AutoModelForImageTextToText.generate``),
answers every easy-VQA test question both ways (greedy) and counts identical answers::

    python bench/export_parity.py runs/easyvqa-llava/model            # all 9,673 test questions
    python bench/export_parity.py runs/easyvqa-llava/model --limit 500

Prints the accuracy of each, the number of identical answers, questions per second of each path,
and as the last line ``identical answers: N / TOTAL``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def vlmkit_answers(pipe, questions, batch_size: int, max_new_tokens: int) -> list[str]:
    from vlmkit.inference.pipeline import GenerationSettings
    from vlmkit.processing.image import load_image

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    out: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        out += pipe.generate([q.text for q in chunk], [[load_image(q.image_path)] for q in chunk], settings)
    return out


def transformers_answers(folder: Path, questions, batch_size: int, max_new_tokens: int) -> list[str]:
    import torch
    import transformers
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(folder, backend="pil")
    processor.tokenizer.padding_side = "left"
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    out: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prompts = [
            processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.text}]}],
                                          add_generation_prompt=True)
            for q in chunk
        ]
        images = [Image.open(q.image_path).convert("RGB") for q in chunk]
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1]:]
        out += [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="vlmkit model folder (or run folder) of an hf-llava-expressible model")
    parser.add_argument("--limit", type=int, default=None, help="only the first N test questions")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--export-dir", default=None, help="keep the export here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import vlmkit
    from vlmkit.data.easyvqa import load_questions
    from vlmkit.formats import export_model, load_any

    questions = load_questions("test")[: args.limit]
    loaded = load_any(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.export_dir) if args.export_dir else Path(tmp) / "hf-llava"
        export_model(loaded.model, loaded.processor, loaded.config, "hf-llava", folder, overwrite=bool(args.export_dir))
        pipe = vlmkit.load(args.model)
        t0 = time.perf_counter()
        ours = vlmkit_answers(pipe, questions, args.batch_size, args.max_new_tokens)
        t1 = time.perf_counter()
        theirs = transformers_answers(folder, questions, args.batch_size, args.max_new_tokens)
        t2 = time.perf_counter()
    n = len(questions)
    same = sum(a == b for a, b in zip(ours, theirs))
    acc = lambda answers: sum(a == q.answer for a, q in zip(answers, questions)) / n  # noqa: E731
    print(f"questions: {n}")
    print(f"vlmkit       accuracy {100 * acc(ours):.2f}%  {n / (t1 - t0):.1f} questions/s")
    print(f"transformers accuracy {100 * acc(theirs):.2f}%  {n / (t2 - t1):.1f} questions/s (AutoProcessor + apply_chat_template + generate)")
    for a, b, q in [(a, b, q) for a, b, q in zip(ours, theirs, questions) if a != b][:10]:
        print(f"  differs: {q.text!r}: vlmkit {a!r}, transformers {b!r}")
    print(f"identical answers: {same} / {n}")
    return 0 if same == n else 1


if __name__ == "__main__":
    sys.exit(main())
