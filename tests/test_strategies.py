"""Strategy pieces that need no second process: FSDP's units per backbone family and vision tower,
the meta-device skeleton that takes the gathered weights back, DeepSpeed config validation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_checkpointing_recomputes, kept_for_backward, TINY_LM, TINY_VISION
from vlmkit.config import ConfigError, TrainConfig
from vlmkit.training.materialize import retie, tie_groups
from vlmkit.training.strategies import fsdp_units, meta_copy

#: the layer class FSDP must shard as a unit, per family / tower (their _no_split_modules)
LM_UNITS = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer", "phi": "PhiDecoderLayer", "mistral": "MistralDecoderLayer",
            "opt": "OPTDecoderLayer", "qwen3": "Qwen3DecoderLayer", "flan_t5": "T5Block", "roberta": "RobertaLayer",
            "chinchilla": "LlamaDecoderLayer", "vicuna": "LlamaDecoderLayer"}
TOWER_UNITS = {"clip": "CLIPEncoderLayer", "siglip": "SiglipEncoderLayer", "vit": "ViTLayer"}


@pytest.mark.parametrize("backbone", sorted(LM_UNITS))
def test_fsdp_shards_every_decoder_layer_of_each_family(build_tiny, backbone):
    model, _ = build_tiny(backbone=backbone)
    names = [type(m).__name__ for m in fsdp_units(model, None)]
    layers = TINY_LM[backbone].get("num_hidden_layers", TINY_LM[backbone].get("num_layers", 2))
    expected = layers * (2 if backbone == "flan_t5" else 1)  # T5: encoder and decoder blocks
    assert names.count(LM_UNITS[backbone]) == expected, names
    assert names.count("CLIPEncoderLayer") == TINY_VISION["clip"]["num_hidden_layers"]


@pytest.mark.parametrize("encoder", sorted(TOWER_UNITS))
def test_fsdp_shards_every_tower_layer(build_tiny, encoder):
    model, _ = build_tiny(encoder=encoder)
    names = [type(m).__name__ for m in fsdp_units(model, None)]
    assert names.count(TOWER_UNITS[encoder]) == TINY_VISION[encoder]["num_hidden_layers"], names


def test_fsdp_wrap_option_names_classes_and_a_wrong_name_is_refused(build_tiny):
    model, _ = build_tiny()
    units = fsdp_units(model, ["LlamaMLP"])
    assert [type(m).__name__ for m in units] == ["LlamaMLP", "LlamaMLP"]
    with pytest.raises(ConfigError, match=r"train\.fsdp\.wrap=\['LlamaBlock'\] matches no module of the model; its classes include .*LlamaDecoderLayer"):
        fsdp_units(model, ["LlamaBlock"])


def test_the_meta_skeleton_takes_the_weights_back_with_ties_and_rotary_buffers(build_tiny):
    """What FSDP and DeepSpeed hand back after a stage: a structural copy made before sharding costs
    no memory, keeps the non-persistent buffers (rotary frequencies) and gets its ties back."""
    model, processor = build_tiny(connector="linear")
    model.language.hf_model.config.tie_word_embeddings = True
    model.language.hf_model.tie_weights()
    skeleton = meta_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(b.is_meta for name, b in skeleton.named_buffers() if "inv_freq" in name)
    skeleton.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    retie(skeleton, tie_groups(model))
    lm = skeleton.language.hf_model
    assert lm.get_input_embeddings().weight is lm.get_output_embeddings().weight
    from test_training import one_batch

    inputs = {k: v for k, v in one_batch(processor).items() if k != "labels"}
    torch.testing.assert_close(skeleton.eval()(**inputs).logits, model.eval()(**inputs).logits, rtol=0, atol=0)


def test_shipped_deepspeed_configs_are_valid_and_filled_from_the_recipe():
    from vlmkit.recipes import list_deepspeed_configs
    from vlmkit.training.deepspeed import fill_config, load_config

    assert list_deepspeed_configs() == ["zero2", "zero3", "zero3-offload"]
    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3-offload", 3)):
        config = fill_config(load_config(name), global_batch=256, micro=16, accumulation=2, max_grad_norm=1.0, precision="bf16")
        assert config["zero_optimization"]["stage"] == stage
        assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (256, 16, 2)
        assert config["gradient_clipping"] == 1.0 and config["bf16"] == {"enabled": True}
        assert "auto" not in json.dumps(config)
    assert "offload_optimizer" in load_config("zero3-offload")["zero_optimization"]


def test_deepspeed_configs_that_contradict_the_recipe_are_refused(tmp_path):
    from vlmkit.training.deepspeed import fill_config, load_config

    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=4 contradicts the recipe's 16 \(from stages\.<stage>\.micro_batch_size\)"):
        fill_config(load_config(str(path)), 256, 16, 2, 1.0, "fp32")
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match=r"has a 'optimizer' section; vlmkit's recipe sets the optimizer"):
        load_config(str(path))
    path.write_text(json.dumps({"zero_optimization": {"stage": 5}}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage=5; valid: 0, 1, 2, 3"):
        load_config(str(path))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"train\.deepspeed='zero9' is neither a shipped DeepSpeed config nor a file; shipped: zero2, zero3, zero3-offload"):
        load_config("zero9")
    path.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True contradicts train\.precision=fp32"):
        fill_config(load_config(str(path)), 8, 4, 1, None, "fp32")


def test_strategy_none_on_several_processes_is_refused(monkeypatch):
    from vlmkit import distributed
    from vlmkit.training.strategies import resolve_strategy

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"train\.strategy=none runs one process, but this launch has 2"):
        resolve_strategy(TrainConfig(strategy="none"))
    assert resolve_strategy(TrainConfig()).name == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp
    assert resolve_strategy(TrainConfig()).name == "fsdp"


def _xattn_model(tokenizer, seed: int = 0):
    from conftest import seeded
    from test_fusion import _batch, _xattn_config
    from vlmkit.models.build import build_model

    seeded(seed)
    model, processor = build_model(_xattn_config(), tokenizer=tokenizer)
    return model, _batch(processor)


def test_a_copy_of_a_cross_attention_model_runs_its_own_blocks(tokenizer):
    """The gated blocks run in hooks on the LM's layers; a deep copy (FSDP's and DeepSpeed's plain model
    after a stage) must run the copy's blocks, not the original's."""
    model, batch = _xattn_model(tokenizer)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    before = model.eval()(**inputs).logits
    skeleton = meta_copy(model)
    skeleton.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    retie(skeleton, tie_groups(model))
    torch.testing.assert_close(skeleton.eval()(**inputs).logits, before, rtol=0, atol=0)
    with torch.no_grad():
        for block in skeleton.fusion.blocks:
            block.attn_gate.fill_(1.0)  # opens the copy's gates only
    assert not torch.allclose(skeleton(**inputs).logits, before)
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)


def test_gradient_checkpointing_recomputes_the_cross_attention_blocks(tokenizer):
    from vlmkit.config import LoraSettings
    from vlmkit.training.policy import apply_policy
    from vlmkit.training.trainer import enable_gradient_checkpointing

    def kept_and_grads(checkpointing: bool):
        model, batch = _xattn_model(tokenizer, seed=2)
        apply_policy(model, {"connector": "full", "fusion": "full"}, LoraSettings())
        with torch.no_grad():
            for block in model.fusion.blocks:
                block.attn_gate.fill_(0.5)  # open gates, so every block parameter gets a gradient
        if checkpointing:
            enable_gradient_checkpointing(model)
        kept, loss = kept_for_backward(lambda: model(**batch).loss)
        loss.backward()
        return kept, [p.grad.clone() for p in model.fusion.parameters()]

    assert_checkpointing_recomputes(kept_and_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cpus, local, requested, expected", [(2, 1, 2, 2), (2, 2, 2, 1), (2, 4, 2, 1), (8, 2, 2, 2),
                                                              (8, 2, 8, 4), (16, 1, 1, 1)])
def test_recipe_threads_are_capped_at_the_node_cpus_shared_by_its_processes(monkeypatch, cpus, local, requested, expected):
    from vlmkit import distributed

    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert distributed.threads_per_process(requested) == expected
