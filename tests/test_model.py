"""The model: every registered tower and backbone builds and trains, splicing is exact, errors are clear,
the fast loss equals the full-logits loss, save/load is lossless and KV-cache generation matches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from conftest import TINY_LM, TINY_VISION, check_quality, seeded, tiny_model_config, train_fixed_batch
from vlmkit.models.build import build_model
from vlmkit.formats import load_model, save_model
from vlmkit.models.connectors.base import CONNECTORS
from vlmkit.models.language.base import BACKBONES
from vlmkit.models.vision.base import VISION_TOWERS
from vlmkit.models.vision.towers import build_vision_encoder
from vlmkit.models.vlm import IGNORE_INDEX, ImageTokenMismatchError
from vlmkit.processing.templates import Message
from vlmkit.registry import RegistryError


def batch_for(processor, n=2, answer="blue circle"):
    images = [Image.new("RGB", (40, 30), (40 * i, 200 - 40 * i, 90)) for i in range(n)]
    encs = [processor.encode([Message("user", "<image>\nwhat is it?"), Message("assistant", answer)], [img]) for img in images]
    return processor.collate(encs, "right")


def test_registries_cover_the_required_families():
    assert {"clip", "siglip", "resnet", "convnext"} <= set(VISION_TOWERS.names())
    assert {"linear", "mlp2x_gelu"} <= set(CONNECTORS.names())
    assert {"llama", "qwen2", "phi"} <= set(BACKBONES.names())


@pytest.mark.parametrize("encoder", sorted(TINY_VISION))
def test_every_tower_trains_end_to_end(build_tiny, encoder):
    model, processor = build_tiny(encoder=encoder)
    batch = batch_for(processor)
    n_tokens = model.vision(batch["pixel_values"]).shape[1]
    assert n_tokens == model.vision.num_tokens == model.num_image_tokens
    assert batch["input_ids"].eq(processor.image_token_id).sum(1).tolist() == [n_tokens] * 2
    losses = train_fixed_batch(model, batch, 15)
    # measured on seeds 0-2 x kernel paths AVX-512 / AVX2 / default, 1 thread (bench/test_quality.py, 9 runs):
    # 0.117-0.188 over bit, clip, convnext, resnet, siglip, vit; bound 0.5
    check_quality(f"tower {encoder}: final/first loss after 15 steps", losses[-1] / losses[0], below=0.5)


DECODERS = sorted(n for n in TINY_LM if n not in ("flan_t5", "roberta"))


@pytest.mark.parametrize("backbone", sorted(TINY_LM))
def test_every_backbone_matches_hf_without_images(build_tiny, backbone):
    model, processor = build_tiny(backbone=backbone)
    model.eval()
    ids = torch.tensor([[5, 9, 33, 70, 2, 11]])
    mask = torch.ones_like(ids)
    ours = model(input_ids=ids, attention_mask=mask).logits
    hf, kind = model.language.hf_model, model.language.spec.kind
    if kind == "decoder":
        ref = hf(input_ids=ids, attention_mask=mask).logits
    elif kind == "encoder-decoder":  # the first answer token's distribution
        start = torch.tensor([[hf.config.decoder_start_token_id]])
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits
    else:  # encoder-only: the answer classifier on the first token's final hidden state
        ref = model.language.vqa_head(hf(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", DECODERS)
def test_fast_loss_equals_full_logits_loss(build_tiny, backbone):
    model, processor = build_tiny(backbone=backbone)
    model.eval()  # OPT's config has dropout 0.1: compare deterministic passes
    batch = batch_for(processor, n=3)
    loss = model(**batch).loss
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_visual_features_land_exactly_on_placeholders(build_tiny):
    model, processor = build_tiny()
    batch = batch_for(processor)
    embeds = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_counts"])
    feats = model.encode_images(batch["pixel_values"])
    is_image = batch["input_ids"] == processor.image_token_id
    for row in range(2):
        torch.testing.assert_close(embeds[row][is_image[row]], feats[row], rtol=0, atol=0)
        text = model.language.embed(batch["input_ids"][row][~is_image[row]])
        torch.testing.assert_close(embeds[row][~is_image[row]], text, rtol=0, atol=0)


def test_count_mismatch_names_row_and_counts(build_tiny):
    model, processor = build_tiny()
    batch = batch_for(processor)
    ids = batch["input_ids"].clone()
    first = ids[1].tolist().index(processor.image_token_id)
    ids[1, first] = 5  # row 1 loses one visual token
    m = model.num_image_tokens
    with pytest.raises(ImageTokenMismatchError, match=f"row 1 has {m - 1} image tokens but 1 image\\(s\\) x {m}"):
        model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
              image_counts=batch["image_counts"], labels=batch["labels"])
    with pytest.raises(ImageTokenMismatchError, match="1 image\\(s\\)"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ImageTokenMismatchError, match="image_counts"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], image_counts=torch.tensor([2, 1]))


def test_feature_layer_and_cls_selection_match_the_tower(build_tiny):
    model, processor = build_tiny(encoder="clip", feature_layer=-2, drop_cls=True)
    pixels = torch.randn(2, 3, 32, 32)
    ref = model.vision.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(model.vision(pixels), ref, rtol=0, atol=0)
    assert model.vision.num_tokens == (32 // 8) ** 2
    keep, _ = build_tiny(encoder="clip", drop_cls=False)
    assert keep.vision.num_tokens == (32 // 8) ** 2 + 1
    with pytest.raises(ValueError, match="feature_layer=7 is out of range.*valid: -3..2"):
        build_tiny(encoder="clip", feature_layer=7)


def test_grid_tower_feature_map_becomes_tokens(build_tiny):
    model, _ = build_tiny(encoder="convnext")
    pixels = torch.randn(1, 3, 32, 32)
    fmap = model.vision.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert fmap.dim() == 4
    tokens = model.vision(pixels)
    assert tokens.shape == (1, fmap.shape[2] * fmap.shape[3], fmap.shape[1])
    torch.testing.assert_close(tokens[0, 1], fmap[0, :, 0, 1], rtol=0, atol=0)  # row-major


def test_pretrained_tower_loads_from_a_local_folder(tmp_path):
    config = transformers.CLIPVisionConfig(**TINY_VISION["clip"])
    torch.manual_seed(3)
    tower = transformers.CLIPVisionModel(config)
    tower.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        '{"crop_size": {"height": 32, "width": 32}, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}'
    )
    enc = build_vision_encoder("clip", str(tmp_path / "clip"), {}, -2, True, None, None, None)
    assert enc.image_size == 32 and enc.image_mean == (0.1, 0.2, 0.3)
    for (name, a), (_, b) in zip(tower.state_dict().items(), enc.tower.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="model_type 'clip_vision_model'.*use model.vision.encoder=clip"):
        build_vision_encoder("siglip", str(tmp_path / "clip"), {}, -2, True, None, None, None)


def test_unknown_ids_and_config_keys_are_named(tokenizer):
    with pytest.raises(RegistryError, match="unknown connector 'qformerx'.*linear.*mlp2x_gelu"):
        build_model(tiny_model_config(connector="qformerx"), tokenizer=tokenizer)
    cfg = tiny_model_config()
    cfg.language.config["hidden_sise"] = 64
    with pytest.raises(ValueError, match="hidden_sise"):
        build_model(cfg, tokenizer=tokenizer)


def test_linear_connector_is_one_matrix(build_tiny):
    model, _ = build_tiny(connector="linear")
    linears = [m for m in model.connector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.shape == (32, 32)


def test_save_and_load_give_identical_logits(build_tiny, tmp_path):
    model, processor = build_tiny(encoder="bit", backbone="qwen2", connector="mlp2x_gelu", connector_options={"merge": 2})
    model.eval()
    batch = batch_for(processor)
    before = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    save_model(model, processor, tiny_model_config(encoder="bit", backbone="qwen2", connector_options={"merge": 2}), tmp_path / "m")
    again, proc2 = load_model(tmp_path / "m")
    batch2 = batch_for(proc2)
    assert torch.equal(batch["input_ids"], batch2["input_ids"]) and torch.equal(batch["pixel_values"], batch2["pixel_values"])
    after = again(**{k: v for k, v in batch2.items() if k != "labels"}).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ["llama", "phi"])
def test_generation_with_and_without_kv_cache_agree(build_tiny, backbone):
    model, processor = build_tiny(backbone=backbone, seed=1)
    model.eval()
    images = [Image.new("RGB", (32, 32), (200, 10, 10)), Image.new("RGB", (32, 32), (10, 10, 200))]
    prompts = [processor.prompt("what color?", [images[0]]), processor.prompt("and what shape is it here?", [images[1]])]
    batch = processor.collate(prompts, "left")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=None)
    cached = model.generate(**batch, use_cache=True, **kw)
    uncached = model.generate(**batch, use_cache=False, **kw)
    assert cached.shape == (2, 8)
    assert torch.equal(cached, uncached)
    # greedy decoding equals argmax of a full forward pass over prompt + generated tokens
    ids = torch.cat([batch["input_ids"], cached[:, :-1]], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(cached[:, :-1])], 1)
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], image_counts=batch["image_counts"]).logits
    assert torch.equal(logits[:, -8:].argmax(-1), cached)


def test_sampling_is_seeded(build_tiny):
    model, processor = build_tiny()
    model.eval()
    batch = processor.collate([processor.prompt("hi", [Image.new("RGB", (32, 32))])], "left")
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=0, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    a = model.generate(**batch, **kw)
    torch.manual_seed(0)
    b = model.generate(**batch, **kw)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# the generic vision family: any AutoModel vision tower (model types no named family lists)

GENERIC_VISION = {
    # sequence with a CLS token
    "dinov2": {"model_type": "dinov2", "hidden_size": 32, "mlp_ratio": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8},
    # sequence with CLS + distillation token
    "deit": {"model_type": "deit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "image_size": 32, "patch_size": 8},
    # sequence without CLS, shorter than the patch grid (patch merging)
    "swin": {"model_type": "swin", "embed_dim": 8, "depths": [1, 1], "num_heads": [2, 2], "image_size": 32, "patch_size": 4,
             "window_size": 4},
    # feature map
    "regnet": {"model_type": "regnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "groups_width": 8},
}
#: (layout, leading non-patch tokens) each tower must be found to have
GENERIC_LAYOUT = {"dinov2": ("sequence", 1), "deit": ("sequence", 2), "swin": ("sequence", 0), "regnet": ("grid", 0)}


def generic_vision_config(model_type: str, encoder: str = "automodel", **kw):
    cfg = tiny_model_config(**kw)
    cfg.vision.encoder = encoder
    cfg.vision.config = dict(GENERIC_VISION[model_type])
    return cfg


@pytest.mark.parametrize("model_type", sorted(GENERIC_VISION))
def test_generic_vision_tower_finds_its_layout_and_trains(tokenizer, model_type):
    from vlmkit.models.vision.towers import resolve_encoder

    assert not any(model_type in s.model_types for _, s in VISION_TOWERS.items()), "pick a type no named family lists"
    assert resolve_encoder("auto", None, GENERIC_VISION[model_type]) == "automodel"
    seeded(0)
    model, processor = build_model(generic_vision_config(model_type, encoder="auto"), tokenizer=tokenizer)
    vision = model.vision
    assert vision.spec.name == "automodel" and (vision.spec.layout, vision.spec.num_prefix_tokens) == GENERIC_LAYOUT[model_type]
    pixels = torch.randn(2, 3, 32, 32)
    vision.eval()  # Swin's stochastic depth (drop_path_rate 0.1) would drop other blocks in each call
    with torch.no_grad():
        hidden = vision.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        tokens = vision(pixels)
    vision.train()
    expected = hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden[:, GENERIC_LAYOUT[model_type][1]:]
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    assert tokens.shape[1:] == (vision.num_tokens, vision.hidden_size)
    batch = batch_for(processor)
    assert batch["input_ids"].eq(processor.image_token_id).sum(1).tolist() == [vision.num_tokens] * 2
    losses = train_fixed_batch(model, batch, 10)
    # measured on seeds 0-2 x kernel paths AVX-512 / AVX2 / default, 1 thread (bench/test_quality.py, 9 runs):
    # 0.333-0.398 over deit, dinov2, regnet, swin; bound 0.5
    check_quality(f"automodel tower {model_type}: final/first loss after 10 steps", losses[-1] / losses[0], below=0.5)


def test_generic_vision_tower_saves_and_reloads(tokenizer, tmp_path):
    cfg = generic_vision_config("dinov2", encoder="auto")
    torch.manual_seed(0)
    model, processor = build_model(cfg, tokenizer=tokenizer)
    model.eval()
    batch = batch_for(processor)
    with torch.no_grad():
        before = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    save_model(model, processor, cfg, tmp_path / "m")
    from vlmkit.formats.vlmkit import read_model_config

    assert read_model_config(tmp_path / "m").vision.encoder == "automodel"
    again, _ = load_model(tmp_path / "m")
    assert type(again.vision.tower).__name__ == "Dinov2Model" and again.vision.num_tokens == 16
    with torch.no_grad():
        after = again(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_encoder_auto_prefers_the_named_family_and_generic_errors_are_clear(tmp_path, tokenizer):
    from vlmkit.models.vision.towers import resolve_encoder

    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION["clip"])).save_pretrained(tmp_path / "clip")
    assert resolve_encoder("auto", str(tmp_path / "clip"), {}) == "clip"
    assert resolve_encoder("auto", None, {"model_type": "convnext"}) == "convnext"
    enc = build_vision_encoder("auto", str(tmp_path / "clip"), {}, -1, True, None, None, None)
    assert enc.spec.name == "clip" and enc.num_tokens == 16
    with pytest.raises(ValueError, match=r"encoder=auto picks the tower family from a model_type"):
        resolve_encoder("auto", None, {})
    with pytest.raises(ValueError, match=r"encoder 'automodel' builds from scratch from model.vision.config.model_type"):
        build_vision_encoder("automodel", None, {"hidden_size": 32}, -1, True, 32, None, None)
    with pytest.raises(ValueError, match=r"BertModel takes no pixel_values, so it is not a vision tower"):
        build_vision_encoder("automodel", None, {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 4, "intermediate_size": 64}, -1, True, 32, None, None)
    with pytest.raises(ValueError, match=r"feature_layer=9 is out of range: this RegNetModel exposes"):
        build_vision_encoder("automodel", None, GENERIC_VISION["regnet"], 9, True, 32, None, None)
    # a registered family given another model type points to the generic one
    transformers.AutoModel.from_config(transformers.Dinov2Config(
        **{k: v for k, v in GENERIC_VISION["dinov2"].items() if k != "model_type"})).save_pretrained(tmp_path / "dinov2")
    with pytest.raises(ValueError, match=r"model_type 'dinov2', which is not a 'vit' tower .*use model.vision.encoder=automodel"):
        build_vision_encoder("vit", str(tmp_path / "dinov2"), {}, -1, True, 32, None, None)
    assert build_vision_encoder("automodel", str(tmp_path / "dinov2"), {}, -1, True, 32, None, None).num_tokens == 16
