"""Evaluation throughput: the fixed-batch path of vlmkit <= 0.2 against the engine, in one run.

The old path ("today's", issue 13: 2.3 questions/s) answered each batch of ``--batch-size`` questions with one left-padded transformers
``generate`` call (every row waits for the batch's longest answer; the batch is padded to its
longest prompt). The engine (``vlmkit.evaluation.runner.predict``) decodes ``--batch-size``
requests together and refills a finished one's slot at the next step. Both answer the same easy-VQA
test questions with the same model; the script checks the answers are identical and prints
questions/s for both, the ratio, and the fraction of a compute bound: the matmul peak of this
machine (an fp32 ``torch.mm`` measured in the same run) divided by the forward FLOPs per question
(2 x language-model parameters x (prompt + generated tokens), LM head only at generated positions,
plus the vision tower).

    python bench/eval_throughput.py                      # SmolLM2 recipe model, 512 questions
    python bench/eval_throughput.py --model runs/easyvqa-smollm2/model --questions 1000

Last line: ``engine / fixed-batch: R x (A vs B questions/s; bound C questions/s, engine at F of it)``.
"""

from __future__ import annotations

import argparse
import time

import torch


def matmul_peak(seconds: float = 3.0, n: int = 1024) -> float:
    """fp32 GFLOP/s of ``torch.mm`` on ``n x n`` matrices over about ``seconds``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def legacy_trim(proc, row: list[int]) -> list[int]:
    """The pre-engine answer trimming, as it was: the stop tokens and stop strings were looked up
    in the tokenizer's vocabulary (``get_vocab()``, a dict of the whole vocabulary) for every answer."""
    tok = proc.tokenizer
    ids = []
    for s in (*proc.template.stop_strings(tok), tok.eos_token):
        if s and s in tok.get_vocab():
            ids.append(tok.convert_tokens_to_ids(s))
    stops, kept = set(ids), []
    for t in row:
        if t in stops:
            break
        kept.append(t)
    text = tok.decode(kept)
    for s in proc.template.stop_strings(tok):
        if s and s in text:
            return tok(text[: text.index(s)], add_special_tokens=False)["input_ids"]
    return kept


def fixed_batches(pipe, items, batch_size: int, max_new_tokens: int, legacy: bool = False) -> list[str]:
    """The pre-engine evaluation path: one left-padded transformers ``generate`` per batch
    (``legacy``: with the per-answer vocabulary look-ups of that code, see :func:`legacy_trim`)."""
    from vlmkit.inference.engine import SamplingParams, finish_ids
    from vlmkit.inference.pipeline import as_image, generate_kwargs

    proc = pipe.processor
    kwargs = generate_kwargs(proc, SamplingParams(max_tokens=max_new_tokens))
    trim = (lambda row: legacy_trim(proc, row)) if legacy else (lambda row: finish_ids(proc, row)[0])
    answers = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        enc = [proc.prompt(it.prompt, [as_image(i) for i in it.images]) for it in chunk]
        batch = proc.collate(enc, padding_side="left")
        with torch.inference_mode():
            out = pipe.model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_counts"], **kwargs)
        answers += [proc.decode(trim(row.tolist())) for row in out]
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model folder (any format vlmkit reads); default: build the easyvqa-smollm2 recipe's model")
    ap.add_argument("--recipe", default="easyvqa-smollm2")
    ap.add_argument("--questions", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import vlmkit
    from vlmkit.config import load_recipe
    from vlmkit.evaluation.runner import predict
    from vlmkit.evaluation.tasks import TASKS, TaskData
    from vlmkit.inference.pipeline import GenerationSettings, VLMPipeline, as_image
    from vlmkit.models.build import build_model

    if args.model:
        pipe = vlmkit.load(args.model)
        name = args.model
    else:
        torch.manual_seed(0)
        model, processor = build_model(load_recipe(args.recipe).model)
        pipe = VLMPipeline(model, processor)
        name = f"{args.recipe} (untrained connector and tower)"
    items = TASKS.get("easyvqa").load(TaskData("easyvqa"))[: args.questions]
    lm = pipe.model.language
    body = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    head = lm.hf_model.get_output_embeddings().weight.numel()
    tower = sum(p.numel() for p in pipe.model.vision.parameters()) + sum(p.numel() for p in pipe.model.connector.parameters())
    prompt_tokens = sum(pipe.processor.prompt(it.prompt, [as_image(i) for i in it.images]).input_ids.numel() for it in items[:64]) / min(64, len(items))
    print(f"model: {name}; LM body {body / 1e6:.1f}M + head {head / 1e6:.1f}M parameters; {len(items)} questions, "
          f"~{prompt_tokens:.1f} prompt tokens each; batch {args.batch_size}; {args.threads} threads; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")

    fixed_batches(pipe, items[:8], 8, args.max_new_tokens)  # warm-up
    t = time.perf_counter()
    old = fixed_batches(pipe, items, args.batch_size, args.max_new_tokens, legacy=True)
    old_s = time.perf_counter() - t
    t = time.perf_counter()
    cached = fixed_batches(pipe, items, args.batch_size, args.max_new_tokens)
    cached_s = time.perf_counter() - t
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    t = time.perf_counter()
    new = predict(pipe, items, args.batch_size, settings, progress=False)
    new_s = time.perf_counter() - t
    same = sum(a == b == c for a, b, c in zip(old, cached, new))
    generated = sum(len(pipe.processor.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in new) / len(new)
    peak = matmul_peak()
    # forward FLOPs of one question: body over prompt + generated positions, head at generated ones,
    # the vision tower + connector counted as one pass over their weights per image token (an upper bound for a conv tower is not needed: it is small)
    flops = 2 * body * (prompt_tokens + generated) + 2 * head * generated + 2 * tower * 16
    bound = peak * 1e9 / flops
    old_qps, new_qps = len(items) / old_s, len(items) / new_s
    print(f"identical answers: {same} / {len(items)}")
    print(f"fixed batches, as before the engine:             {old_s:.1f} s, {old_qps:.2f} questions/s")
    print(f"fixed batches, stop tokens looked up once:       {cached_s:.1f} s, {len(items) / cached_s:.2f} questions/s")
    print(f"engine (continuous batching):                    {new_s:.1f} s, {new_qps:.2f} questions/s")
    print(f"matmul peak {peak:.0f} GFLOP/s; {flops / 1e9:.2f} GFLOP per question -> bound {bound:.2f} questions/s")
    print(f"engine / fixed batches without the look-ups: {new_qps * cached_s / len(items):.2f}x")
    print(f"engine / fixed-batch: {new_qps / old_qps:.2f}x ({new_qps:.2f} vs {old_qps:.2f} questions/s; "
          f"bound {bound:.2f} questions/s, engine at {new_qps / bound:.0%} of it)")


if __name__ == "__main__":
    main()
