"""Fusion styles: prefix tokens (LLaVA) and tanh-gated cross-attention (Flamingo)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import check_quality, seeded, tiny_model_config
from vlmkit.config import FusionConfig, LoraSettings
from vlmkit.inference.pipeline import GenerationSettings, VLMPipeline
from vlmkit.models.build import build_model
from vlmkit.formats import load_model, save_model
from vlmkit.models.fusion import GatedCrossAttentionFusion, decoder_layers
from vlmkit.processing.templates import Message
from vlmkit.training.policy import apply_policy


def _xattn_config(backbone="llama", every=1, **kw):
    cfg = tiny_model_config(backbone=backbone, connector=kw.pop("connector", "resampler"),
                            connector_options={"num_latents": 4, "depth": 1, "num_heads": 2, "head_dim": 8}, **kw)
    cfg.fusion = FusionConfig(type="cross_attention", options={"every": every})
    return cfg


def _batch(processor, pairs=(("what color is it?", "red", (210, 30, 30)), ("what color is it?", "blue", (30, 30, 210)))):
    encoded = [processor.encode([Message("user", f"<image>\n{q}"), Message("assistant", a)], [Image.new("RGB", (32, 32), rgb)])
               for q, a, rgb in pairs]
    return processor.collate(encoded)


def test_cross_attention_keeps_one_placeholder_token_per_image(tokenizer):
    model, processor = build_model(_xattn_config(), tokenizer=tokenizer)
    batch = _batch(processor)
    assert processor.num_image_tokens == model.num_image_tokens == 1
    assert (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [1, 1]
    assert model.connector.num_output_tokens == 4  # the resampler's latents are the cross-attention memory


@pytest.mark.parametrize("every,blocks", [(1, 2), (2, 1)])
def test_blocks_are_inserted_every_n_layers(tokenizer, every, blocks):
    model, _ = build_model(_xattn_config(every=every), tokenizer=tokenizer)
    assert isinstance(model.fusion, GatedCrossAttentionFusion)
    assert len(model.fusion.blocks) == blocks and model.fusion.layer_ids == list(range(0, 2, every))
    # the language model's own weights and state-dict names are untouched by the fusion
    assert not any("fusion" in n or "attn_gate" in n for n in model.language.hf_model.state_dict())


@pytest.mark.parametrize("backbone", ["llama", "opt", "qwen2"])
def test_zero_initialised_gates_give_exactly_the_bare_language_model(tokenizer, backbone):
    torch.manual_seed(0)
    model, processor = build_model(_xattn_config(backbone=backbone), tokenizer=tokenizer)
    model.eval()
    batch = _batch(processor)
    assert all(float(b.attn_gate.detach()) == 0.0 and float(b.ff_gate.detach()) == 0.0 for b in model.fusion.blocks)
    with torch.no_grad():
        fused = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], image_counts=batch["image_counts"]).logits
        bare = model.language.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(fused, bare)


def test_training_the_gates_uses_the_image_and_round_trips(tokenizer, tmp_path):
    seeded(0)
    cfg = _xattn_config()
    model, processor = build_model(cfg, tokenizer=tokenizer)
    batch = _batch(processor)
    # Flamingo's policy: frozen LM, trained connector + fusion (which follows the connector)
    apply_policy(model, {"vision": "frozen", "connector": "full", "language": "frozen"}, LoraSettings())
    assert all(p.requires_grad for p in model.fusion.parameters())
    model(**batch).loss.backward()
    assert all(p.grad is None for p in model.language.parameters()), "the frozen LM received gradients"
    assert all(b.attn_gate.grad is not None and float(b.attn_gate.grad.abs()) > 0 for b in model.fusion.blocks)
    model.zero_grad(set_to_none=True)
    # a random tiny LM cannot be steered in a few steps while frozen: train it too for the behaviour check
    apply_policy(model, {"vision": "frozen", "connector": "full", "language": "full"}, LoraSettings())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    # measured on seeds 0-2 x kernel paths AVX-512 / AVX2 / default, 1 thread (bench/test_quality.py, 9 runs): 0.023-0.038; bound 0.2
    check_quality("cross-attention fusion: final/first loss after 30 steps", losses[-1] / losses[0], below=0.2)
    assert any(float(b.attn_gate.detach()) != 0.0 for b in model.fusion.blocks)
    # the answer now depends on the image: red vs blue rows get different predictions
    model.eval()
    pipe = VLMPipeline(model, processor)
    red, blue = Image.new("RGB", (32, 32), (210, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 210))
    answers = pipe.generate(["what color is it?"] * 2, [[red], [blue]], GenerationSettings(max_new_tokens=3))
    check_quality("cross-attention fusion: colour answers right of 2", (answers == ["red", "blue"]) + 0.0, above=0.5)
    assert pipe.generate(["what color is it?"] * 2, [[red], [blue]], GenerationSettings(max_new_tokens=3, use_cache=False)) == answers
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    save_model(model, processor, cfg, tmp_path / "m")
    assert (tmp_path / "m" / "fusion.safetensors").is_file()
    reloaded, reprocessor = load_model(tmp_path / "m")
    with torch.no_grad():
        logits2 = reloaded(**{k: v for k, v in _batch(reprocessor).items() if k != "labels"}).logits
    assert torch.equal(logits, logits2)


def test_rows_without_images_get_no_cross_attention(tokenizer):
    torch.manual_seed(0)
    model, processor = build_model(_xattn_config(), tokenizer=tokenizer)
    for block in model.fusion.blocks:
        torch.nn.init.constant_(block.attn_gate, 1.0)
    model.eval()
    enc = processor.encode([Message("user", "hello"), Message("assistant", "hi")], [])
    batch = processor.collate([enc])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_counts=batch["image_counts"]).logits
        bare = model.language.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(out).all()
    assert torch.equal(out, bare)  # ff_gate is still 0 and there is nothing to attend to


def test_cross_attention_needs_a_decoder_only_language_model(tokenizer):
    with pytest.raises(ValueError, match=r"cross_attention' needs a decoder-only language model; 'flan_t5' is encoder-decoder"):
        build_model(_xattn_config(backbone="flan_t5"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"every=5 must be between 1 and the language model's 2 layers"):
        build_model(_xattn_config(every=5), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"lora is not supported"):
        model, _ = build_model(_xattn_config(), tokenizer=tokenizer)
        apply_policy(model, {"fusion": "lora", "connector": "full"}, LoraSettings())


def test_decoder_layers_finds_the_layer_list(tokenizer):
    model, _ = build_model(tiny_model_config(backbone="opt"), tokenizer=tokenizer)
    layers = decoder_layers(model.language.hf_model)
    assert len(layers) == 2 and layers is model.language.hf_model.model.decoder.layers
