"""`vlmkit plan`'s memory estimates against measured peak memory, on the CPU (fp32, one process).

Each configuration is trained for a few AdamW steps on one caption batch of a fixed shape (the
trainer's loop: ``model(**batch).loss.backward()``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``),
and planned with ``vlmkit plan``'s own code for the same shape (one device, ``strategy none``, the
per-tensor AdamW the CPU runs).

How memory is measured: ``torch.profiler`` with ``profile_memory=True`` records every allocation and
free of PyTorch's CPU allocator, in order (tensors and the buffers kernels allocate inside); their
running sum is what PyTorch holds above what existed when the steps began, and its maximum plus the
tensors alive before (weights, buffers, the batch) is the measured peak. "Stored" is the same running
sum at the end of a forward pass whose loss is kept: the activations autograd holds for backward.

Configurations: ``tiny`` is the shipped easyvqa-tiny recipe (0.55M parameters: BiT tower, 2x2-merging
MLP, 2-layer Llama), stage ``align`` (everything trains); ``20M`` is easyvqa-llava with a larger CLIP
tower (256 wide, 4 layers, 64 visual tokens) and Llama (512 wide, 5 layers, 4096-token vocabulary):
21.8M parameters, stage ``align``; ``20M-frozen-lm`` trains only its connector (LLaVA's stage 1).
``t5`` swaps easyvqa-tiny's language model for a 2+2-layer Flan-T5 (encoder-decoder: 32 encoder tokens,
16 answer tokens for the decoder), ``t5-frozen-lm`` trains only its connector (BLIP-2's stages);
``xattn`` is easyvqa-llava with gated cross-attention fusion before every layer (each image one
placeholder in the text, its 16 visual tokens through the blocks), ``xattn-frozen-lm`` trains the
connector and the blocks around the frozen language model (Flamingo). Each runs with activation
checkpointing off and on.

    python bench/plan_memory.py                 # all rows (about 3-4 minutes on 2 cores)
    python bench/plan_memory.py --only tiny     # one configuration
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MID = [
    "model.vision.config={hidden_size: 256, intermediate_size: 1024, num_hidden_layers: 4, num_attention_heads: 8, "
    "image_size: 64, patch_size: 8}",
    "model.vision.image_size=64",
    "model.language.config={hidden_size: 512, intermediate_size: 1408, num_hidden_layers: 5, num_attention_heads: 8, "
    "num_key_value_heads: 8, vocab_size: 4096, max_position_embeddings: 512, tie_word_embeddings: true}",
]
FROZEN_LM = ["stages.align.policy={vision: frozen, connector: full, language: frozen}"]
T5 = ["model.language.backbone=flan_t5",
      "model.language.config={d_model: 128, d_ff: 256, d_kv: 32, num_heads: 4, num_layers: 2, num_decoder_layers: 2}"]
XATTN = ["model.fusion.type=cross_attention", "model.fusion.options={every: 1}"]

#: name -> (recipe, overrides, stage, rows, tokens per row (the encoder's, for Flan-T5), answer tokens (Flan-T5))
CONFIGS = {
    "tiny": ("easyvqa-tiny", [], "align", 64, 32, 0),
    "20M": ("easyvqa-llava", MID, "align", 8, 256, 0),
    "20M-frozen-lm": ("easyvqa-llava", MID + FROZEN_LM, "align", 8, 256, 0),
    "t5": ("easyvqa-tiny", T5, "align", 32, 32, 16),
    "t5-frozen-lm": ("easyvqa-tiny", T5 + FROZEN_LM, "align", 32, 32, 16),
    "xattn": ("easyvqa-llava", XATTN, "align", 32, 32, 0),
    "xattn-frozen-lm": ("easyvqa-llava",
                        XATTN + ["stages.align.policy={vision: frozen, connector: full, fusion: full, language: frozen}"],
                        "align", 32, 32, 0),
}


def mb(size: float) -> str:
    return f"{size / 1e6:,.1f} MB"


def run(name: str, checkpointing: bool, steps: int) -> dict:
    import torch

    from vlmkit.planning import PlanOptions, plan_recipe
    from vlmkit.planning.measure import measure_stage

    recipe, overrides, stage, rows, seq_len, answer_len = CONFIGS[name]
    overrides = [*overrides, f"train.gradient_checkpointing={str(checkpointing).lower()}",
                 f"stages.{stage}.batch_size={rows}", "train.precision=fp32", "model.dtype=float32"]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.time()
    measured = measure_stage(recipe, overrides, stage, rows, seq_len, steps=steps, answer_len=answer_len or 16)
    seconds = time.time() - start
    # decoder-only: the plan's labelled positions per micro-batch are rows x round((tokens - visual - 1) x fraction)
    fraction = measured.labelled / (rows * (measured.seq_len - measured.visual_tokens - 1)) if measured.kind == "decoder" else 1.0
    plan = plan_recipe(recipe, overrides, PlanOptions(
        gpus=1, gpu_memory=10**12, strategy="none", micro_batch=rows, seq_len=measured.seq_len, stages=[stage],
        label_fraction=fraction, compare_checkpointing=False, foreach_adamw=False, answer_len=measured.answer_len or 128))
    planned = plan.stages[0]
    shape = f"{rows}x{measured.seq_len}" + (f"+{measured.answer_len}" if measured.answer_len else "")
    return {"config": name, "checkpointing": "on" if checkpointing else "off", "params": measured.parameters,
            "planned_params": planned.stats.total, "shape": shape,
            "stored_est": planned.memory.stored, "stored_meas": measured.stored,
            "peak_est": planned.memory.peak, "peak_meas": measured.peak, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append", help="configurations to run (default: all)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps measured (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.only or list(CONFIGS):
        for checkpointing in (False, True):
            rows.append(run(name, checkpointing, args.steps))
            r = rows[-1]
            print(f"  measured {r['config']} (checkpointing {r['checkpointing']}) in {r['seconds']:.0f} s", file=sys.stderr)
    header = ("config", "ckpt", "params", "batch", "stored est", "stored meas", "peak est", "peak meas", "peak est/meas")
    table = [header]
    worst = 0.0
    for r in rows:
        ratio = r["peak_est"] / r["peak_meas"]
        worst = max(worst, abs(ratio - 1))
        params = f"{r['params']:,}" + ("" if r["params"] == r["planned_params"] else f" (plan {r['planned_params']:,})")
        table.append((r["config"], r["checkpointing"], params, r["shape"], mb(r["stored_est"]), mb(r["stored_meas"]),
                      mb(r["peak_est"]), mb(r["peak_meas"]), f"{ratio:.4f}"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(str(cell).rjust(w) if i and j >= 2 else str(cell).ljust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nlargest deviation of the peak estimate: {100 * worst:.2f}% (acceptance: within 25%)")
    return 0 if worst <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
