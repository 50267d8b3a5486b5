"""Training throughput: vlmkit's VisionLanguageModel step vs transformers' LlavaForConditionalGeneration.

Both models have the same ~27M-parameter architecture (CLIP vision tower 224 px / patch 32, 4 layers,
hidden 256; 2-layer GELU MLP projector; Llama LM 6 layers, hidden 384, vocab 16k) and the same weights
(copied from the reference), see the same batches (LLaVA-style: 49 visual tokens, a prompt, a short
answer that carries the labels) and take plain fp32 AdamW steps. Rounds alternate between the two so
machine noise hits both; the median step time of each is reported.

    python bench/train_throughput.py [--batch-size 8] [--rounds 6] [--steps 3] [--threads 2]

The last line is ``ratio (vlmkit / transformers): X.XX``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from vlmkit.models.connectors.base import CONNECTORS
from vlmkit.models.language.families import build_language_model
from vlmkit.models.vision.towers import build_vision_encoder
from vlmkit.models.vlm import VisionLanguageModel

VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224, patch_size=32)
TEXT = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
            max_position_embeddings=512, vocab_size=16000)
IMAGE_TOKEN = 15999
VISUAL_TOKENS = (224 // 32) ** 2


def reference_model() -> transformers.LlavaForConditionalGeneration:
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION), text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return transformers.LlavaForConditionalGeneration(config)


def vlmkit_model(ref: transformers.LlavaForConditionalGeneration) -> VisionLanguageModel:
    """The same architecture through vlmkit's registries, with the reference's weights copied in."""
    vision = build_vision_encoder("clip", None, dict(VISION), -2, True, 224, None, None)
    language = build_language_model("llama", None, {k: v for k, v in TEXT.items() if k != "vocab_size"}, vocab_size=TEXT["vocab_size"])
    connector = CONNECTORS.get("mlp2x_gelu")(vision.hidden_size, language.hidden_size, vision.num_tokens)
    model = VisionLanguageModel(vision, connector, language, IMAGE_TOKEN)
    vision.tower.load_state_dict(ref.model.vision_tower.state_dict())
    language.hf_model.model.load_state_dict(ref.model.language_model.state_dict())
    language.hf_model.lm_head.load_state_dict(ref.lm_head.state_dict())
    ours, theirs = connector.state_dict(), ref.model.multi_modal_projector.state_dict()
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    connector.load_state_dict(dict(zip(ours, theirs.values())))
    return model


def make_batches(n: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Rows: [bos, 49 image tokens, prompt (40-70 tokens), answer (8-24 tokens)], right-padded."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        rows, labels = [], []
        for _ in range(batch_size):
            prompt = torch.randint(3, 15000, (int(torch.randint(40, 71, (1,), generator=gen)),), generator=gen)
            answer = torch.randint(3, 15000, (int(torch.randint(8, 25, (1,), generator=gen)),), generator=gen)
            ids = torch.cat([torch.tensor([1]), torch.full((VISUAL_TOKENS,), IMAGE_TOKEN), prompt, answer])
            lab = torch.full_like(ids, -100)
            lab[-answer.numel():] = answer
            rows.append(ids)
            labels.append(lab)
        width = max(r.numel() for r in rows)
        input_ids = torch.zeros(batch_size, width, dtype=torch.long)
        label_ids = torch.full((batch_size, width), -100)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labels)):
            input_ids[i, : r.numel()], label_ids[i, : r.numel()], mask[i, : r.numel()] = r, lab, 1
        pixels = torch.randn(batch_size, 3, 224, 224, generator=gen)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels, "labels": label_ids})
    return batches


def step_fn(model: torch.nn.Module):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="alternating measurement rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = reference_model().train()
    ours = vlmkit_model(ref).train()
    n_params = sum(p.numel() for p in ref.parameters())
    batches = make_batches(args.steps, args.batch_size)
    # same weights, same batch -> same loss before any step (the comparison is like for like)
    with torch.no_grad():
        l_ref, l_ours = float(ref(**batches[0]).loss), float(ours(**batches[0]).loss)
    print(f"models: {n_params / 1e6:.1f}M parameters each; first-batch loss transformers {l_ref:.5f} vs vlmkit {l_ours:.5f}")
    steps = {"transformers": step_fn(ref), "vlmkit": step_fn(ours)}
    for step in steps.values():  # warm-up
        step(batches[0])
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for batch in batches:
                start = time.perf_counter()
                step(batch)
                times[name].append(time.perf_counter() - start)
    rate = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    print(f"batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps each, {args.threads} threads, fp32 AdamW")
    print(f"transformers LlavaForConditionalGeneration: {rate['transformers']:.2f} samples/s")
    print(f"vlmkit VisionLanguageModel:                 {rate['vlmkit']:.2f} samples/s")
    print(f"ratio (vlmkit / transformers): {rate['vlmkit'] / rate['transformers']:.2f}")


if __name__ == "__main__":
    main()
