"""vlmkit plan: estimates against measured CPU memory (decoder-only, Flan-T5 encoder-decoder, cross-attention
fusion), exact state by strategy, LoRA counts as peft's, LLaVA-1.5-7B planned offline, parameter counts of
hub architectures and their cache, and errors that name the bad option."""

from __future__ import annotations

import argparse
import copy
import dataclasses

import pytest
import torch

from vlmkit.config import ConfigError
from vlmkit.planning import KNOWN_ARCHITECTURES, PlanOptions, add_plan_parser, format_plan, parse_memory, plan_recipe
from vlmkit.planning.memory import device_memory
from vlmkit.planning.sharding import SHARDING, Hardware, Setup, read_zero_config

GB = 10**9


@pytest.fixture(scope="module")
def tiny_plan():
    """easyvqa-tiny's instruct stage (tower frozen) on one device, both checkpointing settings traced."""
    return plan_recipe("easyvqa-tiny", [], PlanOptions(gpus=1, gpu_memory=GB, stages=["instruct"], micro_batch=8, seq_len=48))


#: a 2+2-layer Flan-T5 in place of easyvqa-tiny's Llama (encoder-decoder)
TINY_T5 = ["model.language.backbone=flan_t5",
           "model.language.config={d_model: 64, d_ff: 128, d_kv: 16, num_heads: 4, num_layers: 2, num_decoder_layers: 2}"]
#: easyvqa-llava (16 visual tokens per image) with gated cross-attention blocks before every layer
CROSS_ATTENTION = ["model.fusion.type=cross_attention", "model.fusion.options={every: 1}"]


def _planned_and_measured(recipe: str, overrides: list[str], answer_len: int = 16):
    """Stage align of ``recipe`` trained for 2 steps on one 8 x 32 batch (measured CPU peak), and planned
    for the same shape on one device."""
    from vlmkit.planning.measure import measure_stage

    overrides = [*overrides, "stages.align.batch_size=8"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory does not depend on it; on a busy 2-core machine 2 threads run 10x slower
    try:
        measured = measure_stage(recipe, overrides, "align", rows=8, seq_len=32, steps=2, answer_len=answer_len)
    finally:
        torch.set_num_threads(threads)
    text = measured.seq_len - measured.visual_tokens - 1
    fraction = measured.labelled / (measured.rows * text) if measured.kind == "decoder" else 1.0
    plan = plan_recipe(recipe, overrides, PlanOptions(
        gpus=1, gpu_memory=GB, strategy="none", stages=["align"], micro_batch=8, seq_len=measured.seq_len,
        label_fraction=fraction, compare_checkpointing=False, foreach_adamw=False, answer_len=measured.answer_len or 128))
    stage = plan.stages[0]
    assert stage.stats.total == measured.parameters and stage.stats.trainable == measured.trainable
    assert stage.memory.state.optimizer == measured.optimizer and stage.memory.state.gradients == measured.gradients
    ratio = stage.memory.peak / measured.peak
    assert abs(ratio - 1) < 0.25, (stage.memory.peak, measured.peak)
    assert abs(stage.memory.stored / measured.stored - 1) < 0.25, (stage.memory.stored, measured.stored)
    return plan, measured


def test_estimate_within_25_percent_of_measured_peak():
    _planned_and_measured("easyvqa-tiny", [])


def test_flan_t5_estimate_within_25_percent_of_measured_peak():
    # bench/plan_memory.py: 0.9995-1.0002 of the measured peak (trained or frozen Flan-T5, checkpointing off and on)
    plan, measured = _planned_and_measured("easyvqa-tiny", TINY_T5, answer_len=16)
    stage = plan.stages[0]
    assert stage.kind == "encoder-decoder" and stage.answer_len == measured.answer_len == 16
    assert stage.labelled == 8 * 16  # the decoder's logits cover every answer position
    assert "+ 16 decoder (answer) tokens" in format_plan(plan) and "--answer-len" in " ".join(plan.notes)


def test_cross_attention_estimate_within_25_percent_of_measured_peak():
    # each image is one placeholder in the text; its 16 visual tokens enter through the gated blocks
    # (bench/plan_memory.py: 0.9996-1.0000 of the measured peak, trained or frozen LM, checkpointing off and on)
    plan, measured = _planned_and_measured("easyvqa-llava", CROSS_ATTENTION)
    stage = plan.stages[0]
    assert stage.visual_tokens == measured.visual_tokens == 1 and stage.media_tokens == 16
    counts = {c.part: c for c in stage.counts}
    assert counts["fusion"].total == counts["fusion"].trainable > 0  # the blocks are a part with its own policy
    assert "1 image placeholder per sample in the sequence, 16 visual tokens through the cross-attention" in format_plan(plan)


def test_encoder_only_plan_classifies_answers():
    overrides = ["model.language.backbone=roberta",
                 "model.language.config={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
                 "num_attention_heads: 4, max_position_embeddings: 300}"]
    plan = plan_recipe("easyvqa-tiny", overrides, PlanOptions(gpus=1, gpu_memory=GB, stages=["instruct"], micro_batch=8,
                                                                 seq_len=32, answers=100, compare_checkpointing=False))
    stage = plan.stages[0]
    assert stage.kind == "encoder" and stage.labelled == 8
    head = plan.base_model.language.vqa_head[-1]
    assert head.out_features == 100 and "sized for 100 answers (--answers)" in " ".join(plan.notes)
    assert stage.trace.backward_flops > 0 and "one answer class per sample" in format_plan(plan)


def test_both_checkpointing_settings_are_reported(tiny_plan):
    stage = tiny_plan.stages[0]
    assert not stage.checkpointing and stage.other is not None
    assert stage.other.stored < stage.memory.stored  # layer inputs only
    text = format_plan(tiny_plan)
    assert "checkpointing off (recipe)" in text and "checkpointing on" in text and "step FLOPs" in text
    assert stage.trace.forward_flops > 0 and stage.trace.backward_flops > stage.trace.forward_flops


def _state(stats, strategy: str, gpus: int, nodes: int = 1, **setup):
    base = Setup(strategy=strategy, precision="bf16", model_dtype="float32", **setup)
    return SHARDING.get(strategy).state(stats, base, Hardware(gpus, nodes, 80 * GB))


def test_weights_gradients_optimizer_exact_by_strategy(tiny_plan):
    stats = tiny_plan.stages[0].stats
    weights, trainable = stats.weight_bytes, stats.trainable_bytes
    none = _state(stats, "none", 1)
    assert (none.weights, none.gradients, none.optimizer) == (weights + stats.buffer_bytes, trainable, 2 * trainable)
    assert _state(stats, "ddp", 4).buffers == trainable  # DDP's gradient buckets
    fsdp = _state(stats, "fsdp", 4)
    assert (fsdp.weights - stats.buffer_bytes, fsdp.gradients, fsdp.optimizer) == (weights / 4, trainable / 4, 2 * trainable / 4)
    hybrid = _state(stats, "fsdp", 8, nodes=2, fsdp_sharding="hybrid")  # shards within a node of 4
    assert hybrid.optimizer == fsdp.optimizer
    zero2 = _state(stats, "deepspeed", 4, deepspeed="zero2", zero=read_zero_config("zero2"))
    # (every tensor of the tiny model is below ZeRO-3's persistence threshold, which keeps small tensors whole)
    zero3 = _state(stats, "deepspeed", 4, deepspeed="zero3",
                   zero={**read_zero_config("zero3"), "stage3_param_persistence_threshold": 0})
    assert zero2.optimizer == zero3.optimizer == 12 * stats.trainable / 4  # fp32 master + 2 Adam states, partitioned
    assert zero2.gradients == zero3.gradients == 2 * stats.trainable / 4  # bf16, partitioned
    assert zero2.weights == 2 * stats.total + stats.buffer_bytes and zero3.weights == 2 * stats.total / 4 + stats.buffer_bytes
    offload = _state(stats, "deepspeed", 4, deepspeed="zero3-offload", zero=read_zero_config("zero3-offload"))
    assert offload.optimizer == 0 and offload.host > 0


def test_lora_counts_equal_peft(tokenizer):
    from vlmkit.config import load_recipe
    from vlmkit.models.build import build_model
    from vlmkit.training.policy import apply_policy

    overrides = ["stages.instruct.policy.language=lora", "stages.instruct.lora={r: 4, alpha: 8}"]
    plan = plan_recipe("easyvqa-tiny", overrides, PlanOptions(gpus=1, gpu_memory=GB, stages=["instruct"], micro_batch=4,
                                                                 seq_len=32, compare_checkpointing=False))
    recipe = load_recipe("easyvqa-tiny", overrides)
    model, _ = build_model(recipe.model, tokenizer=tokenizer)
    apply_policy(model, recipe.stages[1].policy, recipe.stages[1].lora)
    peft_trainable, _ = model.language.model.get_nb_trainable_parameters()
    counts = {c.part: c for c in plan.stages[0].counts}
    assert counts["language"].lora == counts["language"].trainable == peft_trainable > 0
    assert plan.stages[0].stats.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def llava_finetune_plan():
    """llava15-7b's finetune stage on 8 x 80 GiB (planned offline, on the meta device)."""
    return plan_recipe("llava15-7b", [], PlanOptions(gpus=8, gpu_memory=parse_memory("80GiB"), stages=["finetune"],
                                                       compare_checkpointing=False))


def test_llava15_7b_fits_on_8_gpus_with_its_checkpointing(llava_finetune_plan):
    plan = llava_finetune_plan
    stage = plan.stages[0]
    counts = {c.part: c.total for c in stage.counts}
    # CLIP ViT-L/14-336 + mlp2x_gelu + Vicuna-7B with one embedding row grown for <image>
    assert counts == {"vision": 303_507_456, "connector": 20_979_712, "fusion": 0, "language": 6_738_415_616 + 2 * 4096}
    assert stage.checkpointing and stage.micro == 16 and stage.accumulation == 1
    assert stage.memory.fits(plan.hardware), format_plan(plan)
    assert stage.memory.stored < 20 * GB  # layer inputs + the loss head, not 200 GB of activations
    assert stage.step_flops > 6 * 7e9 * 128 * 2048 * 0.9  # ~6 x parameters x tokens, plus recomputation


def test_a_saved_model_folder_is_planned_from_its_description(tokenizer, tmp_path):
    from vlmkit.config import load_recipe
    from vlmkit.formats import save_model
    from vlmkit.models.build import build_model

    cfg = load_recipe("easyvqa-tiny", ["model.max_length=200"]).model
    model, processor = build_model(cfg, tokenizer=tokenizer)
    folder = save_model(model, processor, cfg, tmp_path / "model")
    plan = plan_recipe("easyvqa-tiny", [f"model.pretrained={folder}"], PlanOptions(
        gpus=1, gpu_memory=GB, stages=["instruct"], micro_batch=4, compare_checkpointing=False))
    assert {c.part: c.total for c in plan.stages[0].counts} == {name: sum(p.numel() for p in part.parameters())
                                                                 for name, part in model.parts().items()}
    assert plan.stages[0].seq_len == 200 and "vlmkit_config.json" in " ".join(plan.notes)  # the folder's max_length
    with pytest.raises(ConfigError, match=r"has no vlmkit_config.json \(another format\)"):
        plan_recipe("easyvqa-tiny", [f"model.pretrained={tmp_path}"], PlanOptions(gpus=1))


@pytest.mark.parametrize("backbone, hub_id, expected", [
    # Flan-T5-XL's published 2,849,757,184 (an lm_head of its own: transformers 5 builds T5 tied from a config,
    # but loads the checkpoint's two tensors untied); its 32,128 rows already hold <image>
    ("flan_t5", "google/flan-t5-xl", 2_849_757_184),
    # Llama-2's 6,738,415,616 and 13,015,864,320, plus the <image> row in the embeddings and the head
    ("llama", "meta-llama/Llama-2-7b-chat-hf", 6_738_415_616 + 2 * 4096),
    ("llama", "meta-llama/Llama-2-13b-chat-hf", 13_015_864_320 + 2 * 5120),
])
def test_hub_language_models_count_as_published(backbone, hub_id, expected):
    from vlmkit.config import load_recipe
    from vlmkit.planning.counts import parameter_counts

    overrides = [f"model.language.backbone={backbone}", f"model.language.pretrained={hub_id}", "model.language.config={}",
                 "model.language.tokenizer.train_vocab_size=null"]
    assert parameter_counts(load_recipe("easyvqa-tiny", overrides).model, cache=False)["language"] == expected


def test_parameter_counts_are_cached_and_a_bad_cache_is_ignored(tmp_path, monkeypatch):
    from vlmkit.config import load_recipe
    from vlmkit.planning import counts

    monkeypatch.delenv("VLMKIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert counts.cache_dir() == tmp_path / "vlmkit"
    cfg = load_recipe("easyvqa-tiny", []).model
    fresh = counts.parameter_counts(cfg, cache=False)
    assert not (tmp_path / "vlmkit").exists()
    assert counts.parameter_counts(cfg) == fresh and set(fresh) == {"vision", "connector", "fusion", "language"}
    path = tmp_path / "vlmkit" / counts.CACHE_FILE
    assert path.is_file()

    def no_build(cfg):
        raise AssertionError("counted again instead of reading the cache")

    with monkeypatch.context() as patched:
        patched.setattr(counts, "_count", no_build)
        assert counts.parameter_counts(cfg) == fresh  # the second call reads the cache
    other = load_recipe("easyvqa-tiny", ["model.language.config.num_hidden_layers=3"]).model
    assert counts.cache_key(other) != counts.cache_key(cfg)
    for bad in ("{not json", '{"format": 1, "entries": {"%s": {"vision": -1}}}' % counts.cache_key(cfg), "[]"):
        path.write_text(bad)
        assert counts.parameter_counts(cfg) == fresh  # ignored, counted again and rewritten
        assert counts._read(path) == {counts.cache_key(cfg): fresh}


def test_known_architectures_are_plain_config_dicts():
    arch = KNOWN_ARCHITECTURES.get("lmsys/vicuna-7b-v1.5")
    assert arch.role == "language" and arch.config["hidden_size"] == 4096 and arch.tokenizer_size == 32000
    needed = {  # what the shipped recipes name (tests/test_recipes.py checks each recipe's own)
        "vision": {"openai/clip-vit-large-patch14-336", "openai/clip-vit-large-patch14", "google/siglip-so400m-patch14-384",
                   "Salesforce/blip2-opt-2.7b"},
        "language": {"lmsys/vicuna-7b-v1.5", "lmsys/vicuna-7b-v1.3", "lmsys/vicuna-13b-v1.5", "meta-llama/Llama-2-7b-chat-hf",
                     "meta-llama/Llama-2-13b-chat-hf", "meta-llama/Llama-3.1-8B-Instruct", "microsoft/phi-2",
                     "facebook/opt-2.7b", "google/flan-t5-xl"},
    }
    for role, ids in needed.items():
        known = [KNOWN_ARCHITECTURES.get(a) for a in KNOWN_ARCHITECTURES]
        assert ids <= {arch.hub_id for arch in known if arch.role == role}, role


@pytest.mark.parametrize("text, size", [("80GB", 80 * GB), ("80GiB", 80 * 2**30), ("24G", 24 * GB), ("40000MB", 40 * GB),
                                        ("1.5TB", 1500 * GB)])
def test_memory_sizes(text, size):
    assert parse_memory(text) == size


def _cli(*argv):
    parser = argparse.ArgumentParser(prog="vlmkit")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


@pytest.mark.parametrize("argv, message", [
    (["easyvqa-tiny", "--gpu-memory", "80 gigs"], "--gpu-memory='80 gigs' is not a memory size"),
    (["easyvqa-tiny", "--strategy", "zero"], "--strategy='zero' is not valid; choose one of"),
    (["easyvqa-tiny", "--gpus", "3"], "batch_size=64 (the global batch) does not divide over 3 processes"),
    (["easyvqa-tiny", "--gpus", "4", "--micro-batch", "3"], "is not a multiple of micro_batch_size=3 x 4"),
    (["easyvqa-tiny", "--gpus", "4", "--nodes", "3"], "--gpus=4 does not spread evenly over --nodes=3"),
    (["easyvqa-tiny", "--strategy", "fsdp", "--deepspeed", "zero3"], "--deepspeed=zero3 configures the deepspeed strategy"),
    (["easyvqa-tiny", "--deepspeed", "zero9"], "shipped: zero2, zero3, zero3-offload"),
    (["llava15-7b", "model.language.pretrained=org/unknown-7b"], "'org/unknown-7b' is neither a local folder nor"),
    (["easyvqa-tiny", "--answer-len", "0"], "--answer-len=0 must be at least 1"),
])
def test_bad_input_names_the_option(argv, message):
    with pytest.raises(ConfigError) as info:
        _cli(*argv)
    assert message in str(info.value)


def test_known_bad_combinations_are_flagged(tiny_plan):
    from vlmkit.config import load_recipe
    from vlmkit.planning.advice import FLAGS

    recipe = load_recipe("easyvqa-tiny", ["train.strategy=none", "model.dtype=float16", "train.precision=bf16"])
    plan = dataclasses.replace(tiny_plan, recipe=recipe, hardware=Hardware(2, 1, GB),
                               setup=dataclasses.replace(tiny_plan.setup, strategy="none"))
    flags = " ".join(line for name in FLAGS if (line := FLAGS.get(name)(plan, PlanOptions())))
    assert "train.strategy=none runs one process, but 2 GPUs" in flags
    assert "model.dtype=float16 under bf16 autocast" in flags
    hybrid = dataclasses.replace(plan, setup=dataclasses.replace(plan.setup, strategy="fsdp", fsdp_sharding="hybrid"))
    assert "on one node it is full sharding" in FLAGS.get("hybrid-on-one-node")(hybrid, PlanOptions())


def test_advice_when_a_stage_does_not_fit(tiny_plan):
    from vlmkit.planning.advice import add_advice

    stage = copy.copy(tiny_plan.stages[0])
    small = Hardware(1, 1, int(stage.memory.peak * 0.9))
    plan = dataclasses.replace(tiny_plan, hardware=small, stages=[stage], flags=[], notes=[])
    add_advice(plan, PlanOptions(gpus=1, gpu_memory=small.gpu_memory))
    advice = " ".join(stage.advice)
    assert not plan.fits and "gradient_checkpointing=true" in advice and "micro_batch_size=4" in advice
    assert device_memory(stage.stats, plan.setup, small, stage.trace, stage.accumulation, stage.memory.batch).peak == pytest.approx(stage.memory.peak)
    assert torch.get_default_device().type == "cpu"  # no meta device left set globally


def test_the_whole_model_on_each_gpu_before_fsdp_shards_it_can_be_the_peak(tiny_plan, llava_finetune_plan):
    """FSDP allocates the whole model on every device before sharding it (start of each stage) and
    DeepSpeed copies it out of its engine at the end of a stage: with many GPUs and a small micro-batch
    that moment, not the step, sets the peak, and the advice says so instead of offering smaller batches."""
    from vlmkit.planning.advice import add_advice
    from vlmkit.planning.memory import HANDOVER, scaled_trace

    stats = tiny_plan.stages[0].stats
    fsdp, ddp = _state(stats, "fsdp", 64), _state(stats, "ddp", 64)
    assert fsdp.handover == stats.weight_bytes + stats.buffer_bytes and ddp.handover == 0
    zero2 = _state(stats, "deepspeed", 4, deepspeed="zero2", zero=read_zero_config("zero2"))
    # bf16 weights held by the engine, its optimizer and gradient partitions, then a bf16 clone and fp32 trainables
    assert zero2.handover == zero2.weights + zero2.optimizer + zero2.gradients + 2 * stats.total + 4 * stats.trainable

    # LLaVA-1.5-7B's finetune stage (fp32 weights, FSDP) on 128 GPUs at one sample per GPU
    stage = copy.copy(llava_finetune_plan.stages[0])
    setup, trace = llava_finetune_plan.setup, scaled_trace(stage.trace, 1 / stage.micro)
    memory = device_memory(stage.stats, setup, Hardware(128, 16, 80 * GB), trace, 1, stage.memory.batch / stage.micro)
    whole = stage.stats.weight_bytes + stage.stats.buffer_bytes
    assert setup.strategy == "fsdp" and memory.phase == HANDOVER and memory.peak == whole > 27 * GB
    stage.memory = memory
    small = Hardware(128, 16, int(whole * 0.9))
    plan = dataclasses.replace(llava_finetune_plan, hardware=small, stages=[stage], flags=[], notes=[])
    add_advice(plan, PlanOptions(gpus=128, gpu_memory=small.gpu_memory))
    assert any("whole model" in line and "before FSDP shards it" in line for line in stage.advice), stage.advice
