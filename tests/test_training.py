"""Training: policies put gradients exactly where declared, LoRA round-trips, runs resume exactly,
stage outputs follow LLaVA's layout and the saved model reproduces the trained one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate.utils import set_seed
from PIL import Image

from conftest import assert_checkpointing_recomputes, kept_for_backward, TINY_VISION, check_quality, tiny_recipe_dict
from vlmkit.config import ConfigError, LoraSettings, RecipeConfig, complete_policy, from_dict
from vlmkit.models.build import build_model
from vlmkit.formats import load_model
from vlmkit.processing.tokenizer import load_tokenizer
from vlmkit.processing.templates import Message
from vlmkit.training.lora import has_lora, load_lora, merge_lora, save_lora
from vlmkit.training.policy import apply_policy, format_policy
from vlmkit.training.run import run_training
from vlmkit.training.stage_output import apply_stage_output
from vlmkit.training.trainer import TrainingInterrupted


def one_batch(processor):
    images = [Image.new("RGB", (32, 32), (200, 20, 20)), Image.new("RGB", (32, 32), (20, 20, 200))]
    encs = [processor.encode([Message("user", "<image>\nwhat color?"), Message("assistant", a)], [im]) for im, a in zip(images, ["red", "blue"])]
    return processor.collate(encs)


POLICIES = [
    {"vision": "frozen", "connector": "full", "language": "frozen"},  # LLaVA stage 1
    {"vision": "frozen", "connector": "full", "language": "full"},  # LLaVA stage 2, full
    {"vision": "frozen", "connector": "full", "language": "lora"},  # LLaVA stage 2, LoRA
    {"vision": "full", "connector": "frozen", "language": "frozen"},
    {"vision": "lora", "connector": "full", "language": "lora"},
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(f"{k[0]}{v}" for k, v in p.items()))
def test_gradients_exactly_where_declared(build_tiny, policy):
    model, processor = build_tiny(feature_layer=-2)
    unused = {f"tower.{n}" for n in model.vision.unused_parameters()}
    # CLIP: the last layer and the post-norm feed nothing when features come from the penultimate layer
    assert "tower.post_layernorm.weight" in unused and any(".layers.1." in n for n in unused)
    assert not any(".layers.0." in n for n in unused)
    reports = apply_policy(model, policy, LoraSettings(r=2, alpha=4, dropout=0.0))
    policy = complete_policy(policy)
    for name, part in model.parts().items():
        assert part.training == (policy[name] != "frozen"), name
    model(**one_batch(processor)).loss.backward()
    for name, part in model.parts().items():
        for pname, p in part.named_parameters():
            is_lora = "lora_" in pname
            should_train = policy[name] == "full" or (policy[name] == "lora" and is_lora)
            if name == "vision" and pname.replace("base_model.model.", "").replace(".base_layer", "") in unused or (
                name == "vision" and is_lora and any(pname.replace("base_model.model.", "").startswith(u.rsplit(".", 1)[0]) for u in unused)
            ):
                should_train = False
            assert p.requires_grad == should_train, (name, pname)
            if not should_train:
                assert p.grad is None, (name, pname)
            elif not (is_lora and "lora_A" in pname):  # lora_A's grad is zero at init (B = 0)
                assert p.grad is not None and p.grad.abs().sum() > 0, (name, pname)
    counts = {r.part: (r.trainable, r.total) for r in reports}
    assert counts["connector"][0] == (counts["connector"][1] if policy["connector"] == "full" else 0)
    text = format_policy("s", reports)
    assert all(f"{part:<10} {policy[part]:<7}" in text for part in policy)


def test_connector_lora_is_rejected(build_tiny):
    model, _ = build_tiny()
    with pytest.raises(ValueError, match="connector=lora is not supported"):
        apply_policy(model, {"connector": "lora"}, LoraSettings())


def test_lora_save_reload_and_merge_give_the_same_logits(build_tiny, tmp_path):
    model, processor = build_tiny(seed=4)
    apply_policy(model, {"connector": "full", "language": "lora"}, LoraSettings(r=4, alpha=8, dropout=0.0))
    batch = one_batch(processor)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trained = model(**inputs).logits
    save_lora(model.language, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh, _ = build_tiny(seed=4)
    fresh.connector.load_state_dict(model.connector.state_dict())
    fresh.eval()
    base = fresh(**inputs).logits
    assert not torch.allclose(base, trained, atol=1e-4)  # the adapters changed something
    load_lora(fresh.language, tmp_path / "adapter")
    torch.testing.assert_close(fresh(**inputs).logits, trained, rtol=0, atol=0)
    merge_lora(fresh.language)
    assert not has_lora(fresh.language)
    torch.testing.assert_close(fresh(**inputs).logits, trained, rtol=1e-5, atol=1e-5)


def recipe(llava_data, out, **stage_changes) -> RecipeConfig:
    data = tiny_recipe_dict(llava_data, out)
    for stage in data["stages"]:
        stage.update(stage_changes)
    return from_dict(RecipeConfig, data)


def losses_of(folder, stage):
    return [r["loss"] for r in map(json.loads, (folder / "stages" / stage / "metrics.jsonl").read_text().splitlines())]


def test_run_layout_outputs_and_reloaded_model(llava_data, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO", logger="vlmkit")
    summary = run_training(recipe(llava_data, out))
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()
    align, instruct = out / "stages" / "align", out / "stages" / "instruct"
    # stage 1 leaves only the projector (LLaVA's mm_projector); stage 2 leaves LoRA adapters
    assert (align / "connector.safetensors").is_file()
    assert not (align / "language").exists() and not (align / "vision").exists()
    assert (instruct / "adapters" / "language" / "adapter_config.json").is_file()
    for stage in (align, instruct):
        assert (stage / "loss.png").stat().st_size > 0
        records = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
        assert {"loss", "lr", "samples_per_s", "step"} <= set(records[0])
    assert len(losses_of(out, "align")) == 4 and len(losses_of(out, "instruct")) == 6
    policy_lines = [r.getMessage() for r in caplog.records if "trainability" in r.getMessage()]
    assert len(policy_lines) == 2 and "language   lora" in policy_lines[1]
    # the saved model equals what the stages produced: the run's initial model (same seed), then each
    # stage's outputs applied (stage 1's connector; stage 2's connector and LoRA adapters, merged)
    cfg = recipe(llava_data, out)
    set_seed(cfg.train.seed)
    rebuilt, processor = build_model(cfg.model, load_tokenizer(str(out / "tokenizer")))
    untrained = rebuilt.eval()(**{k: v for k, v in one_batch(processor).items() if k != "labels"}).logits
    for stage in (align, instruct):
        apply_stage_output(rebuilt, stage)
    inputs = {k: v for k, v in one_batch(processor).items() if k != "labels"}
    expected = rebuilt.eval()(**inputs).logits
    assert not torch.allclose(expected, untrained, atol=1e-3)  # training changed the model
    saved, saved_processor = load_model(summary.model_dir)
    assert saved_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    torch.testing.assert_close(saved.eval()(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_resume_restores_batchnorm_statistics_and_lora_mid_stage(llava_data, tmp_path):
    """A ResNet tower trained in stage 1 changes its BatchNorm running statistics (buffers, not
    parameters); stage 2 (tower frozen, eval mode) depends on them. Stopping in both stages, the
    second one a LoRA stage, must give the uninterrupted run's losses and final weights (stage 1
    augments its images, so the random draws resume too)."""

    def resnet_recipe(out):
        data = tiny_recipe_dict(llava_data, out)
        data["model"]["vision"] = {"encoder": "resnet", "config": dict(TINY_VISION["resnet"]), "image_size": 32}
        data["stages"][0]["policy"] = {"vision": "full", "connector": "full"}
        data["stages"][0]["data"]["augment"] = ["hflip", "rot90"]  # draws from the RNG the checkpoints keep
        return from_dict(RecipeConfig, data)

    full, part = tmp_path / "full", tmp_path / "part"
    run_training(resnet_recipe(full), evaluate=False)
    cfg = resnet_recipe(part)
    cfg.train.save_every = 1
    with pytest.raises(TrainingInterrupted):
        run_training(cfg, stop_after=2)  # align, tower in training mode
    run_training(cfg, only_stages=["align"])
    with pytest.raises(TrainingInterrupted):
        run_training(cfg, stop_after=3)  # instruct, LoRA adapters
    run_training(cfg, evaluate=False)
    assert losses_of(part, "align") == losses_of(full, "align")
    assert losses_of(part, "instruct") == losses_of(full, "instruct")
    a, _ = load_model(full / "model")
    b, _ = load_model(part / "model")
    state_a, state_b = a.state_dict(), b.state_dict()
    assert any("running_mean" in name for name in state_a)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_resume_after_stop_gives_the_same_losses(llava_data, tmp_path):
    full = tmp_path / "full"
    run_training(recipe(llava_data, full), evaluate=False)
    part = tmp_path / "part"
    cfg = recipe(llava_data, part)
    cfg.train.save_every = 1
    with pytest.raises(TrainingInterrupted):
        run_training(cfg, stop_after=2)
    with pytest.raises(TrainingInterrupted):  # resumes align at step 2, stops in it again at step 3
        run_training(cfg, stop_after=1)
    assert len(losses_of(part, "align")) == 3
    run_training(cfg, evaluate=False)
    assert losses_of(part, "align") == losses_of(full, "align")
    assert losses_of(part, "instruct") == losses_of(full, "instruct")
    a, _ = load_model(full / "model")
    b, _ = load_model(part / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_changed_config_in_existing_run_is_refused(llava_data, tmp_path):
    out = tmp_path / "run"
    cfg = recipe(llava_data, out)
    cfg.train.save_every = 1
    with pytest.raises(TrainingInterrupted):
        run_training(cfg, stop_after=1)
    cfg.stages[0].lr = 0.5
    with pytest.raises(ConfigError, match="stages.*lr"):
        run_training(cfg)


@pytest.mark.parametrize("micro", [2, 1])
def test_grad_accumulation_matches_one_big_batch(llava_data, tmp_path, micro):
    """The global batch of 4 in micro-batches of 2 or 1 (accumulation 2 or 4): the same losses and
    weights as one forward over all 4, because the loss is the mean over the global batch's tokens
    (samples differ in answer length, so a mean of per-micro-batch means would differ)."""
    big = recipe(llava_data, tmp_path / "big", max_steps=3, batch_size=4)
    small = recipe(llava_data, tmp_path / "small", max_steps=3, batch_size=4, micro_batch_size=micro)
    for cfg in (big, small):
        cfg.stages[1].max_steps = 2
        run_training(cfg, evaluate=False)
    for stage in ("align", "instruct"):
        assert losses_of(tmp_path / "small", stage) == pytest.approx(losses_of(tmp_path / "big", stage), rel=1e-5, abs=1e-6)
    a, _ = load_model(tmp_path / "big" / "model")
    b, _ = load_model(tmp_path / "small" / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)


def test_loss_is_the_token_mean_of_the_global_batch(build_tiny):
    """The reported loss sums token losses over micro-batches and divides once by all their tokens."""
    from vlmkit.training.trainer import mask_targets

    model, processor = build_tiny()
    batch = one_batch(processor)
    out = model(**batch)
    assert out.num_label_tokens == model.count_targets(batch) > 0
    torch.testing.assert_close(out.loss_sum / out.num_label_tokens, out.loss)
    masked = mask_targets(batch)
    assert model.count_targets(masked) == 0 and float(model(**masked).loss_sum) == 0.0
    assert torch.equal(batch["labels"], one_batch(processor)["labels"])  # the original batch is untouched


def test_removed_grad_accum_key_says_what_replaced_it(llava_data, tmp_path):
    data = tiny_recipe_dict(llava_data, tmp_path)
    data["stages"][0]["grad_accum"] = 8
    with pytest.raises(ConfigError, match=r"stages\.0\.grad_accum is no longer a setting.*micro_batch_size"):
        from_dict(RecipeConfig, data)


@pytest.mark.parametrize("batch,micro,world,message", [
    (8, None, 3, r"batch_size=8 \(the global batch\) does not divide over 3 processes"),
    (8, 3, 1, r"not a multiple of micro_batch_size=3 x 1 process\(es\) = 3"),
    (8, 2, 3, r"not a multiple of micro_batch_size=2 x 3 process\(es\) = 6"),
])
def test_global_batch_that_does_not_divide_is_refused(batch, micro, world, message):
    from vlmkit.config import StageConfig

    stage = StageConfig(name="s", batch_size=batch, micro_batch_size=micro)
    with pytest.raises(ConfigError, match=message):
        stage.micro_and_accumulation(world)


def test_global_batch_sampler_splits_the_same_batches_on_any_world_size():
    """Every global batch is the same set of samples whatever the processes and accumulation; a short
    last batch is shared out (some parts empty) instead of dropped."""
    from vlmkit.data.dataset import GlobalBatchSampler

    def step_sets(world, accum):
        per_rank = [list(GlobalBatchSampler(10, 4, accum, seed=3, epoch=1, processes=world, rank=r)) for r in range(world)]
        steps = []
        for k in range(3):
            parts = [per_rank[r][k * accum + j] for r in range(world) for j in range(accum)]
            steps.append(sorted(i for part in parts for i, _ in part))
        return steps, per_rank

    reference, _ = step_sets(1, 1)
    assert [len(s) for s in reference] == [4, 4, 2] and sorted(sum(reference, [])) == list(range(10))
    for world, accum in ((2, 1), (2, 2), (4, 1), (1, 4)):
        steps, per_rank = step_sets(world, accum)
        assert steps == reference, (world, accum)
        assert all(len(p) == 4 // (world * accum) for r in per_rank for p in r[: 2 * accum])  # full batches: equal parts
    assert GlobalBatchSampler(10, 4, 1, seed=3, epoch=2).draw_seed != GlobalBatchSampler(10, 4, 1, seed=3, epoch=1).draw_seed


def test_gradient_checkpointing_gives_the_same_losses(llava_data, tmp_path):
    plain = recipe(llava_data, tmp_path / "plain", max_steps=3, policy={"vision": "full", "connector": "full", "language": "full"})
    ckpt = recipe(llava_data, tmp_path / "ckpt", max_steps=3, policy={"vision": "full", "connector": "full", "language": "full"})
    ckpt.train.gradient_checkpointing = True
    for cfg in (plain, ckpt):
        cfg.stages = cfg.stages[:1]
        run_training(cfg, evaluate=False)
    assert losses_of(tmp_path / "ckpt", "align") == pytest.approx(losses_of(tmp_path / "plain", "align"), rel=1e-5)


def test_gradient_checkpointing_recomputes_a_frozen_language_model_that_gradients_pass_through(build_tiny):
    """LLaVA's stage 1: only the connector trains, the LM is frozen (eval mode) but the connector's
    gradient flows back through it. Its layers must still be recomputed rather than stored: the
    tensors autograd keeps during the forward shrink, and the gradients stay exactly the same."""
    from vlmkit.training.trainer import enable_gradient_checkpointing

    def saved_bytes_and_grads(checkpointing: bool):
        model, processor = build_tiny(seed=3)
        apply_policy(model, {"connector": "full"}, LoraSettings())
        assert not model.language.training
        if checkpointing:
            enable_gradient_checkpointing(model)
        kept, loss = kept_for_backward(lambda: model(**one_batch(processor)).loss)
        loss.backward()
        return kept, [p.grad.clone() for p in model.connector.parameters()]

    assert_checkpointing_recomputes(saved_bytes_and_grads, rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_is_enabled_in_both_towers(build_tiny):
    from vlmkit.training.trainer import enable_gradient_checkpointing

    model, _ = build_tiny()
    towers = (model.vision.tower, model.language.hf_model)
    assert [t.is_activation_checkpointing for t in towers] == [False, False]
    enable_gradient_checkpointing(model)
    assert [t.is_activation_checkpointing for t in towers] == [True, True]
    assert model.language.hf_model.config.use_cache is False


def test_training_reduces_loss(llava_data, tmp_path):
    cfg = recipe(llava_data, tmp_path / "r", max_steps=20, lr=3e-3, warmup_ratio=0.0,
                 policy={"vision": "full", "connector": "full", "language": "full"})
    cfg.stages = cfg.stages[:1]
    run_training(cfg, evaluate=False)
    losses = losses_of(tmp_path / "r", "align")
    # measured on seeds 0-2 x kernel paths AVX-512 / AVX2 / default, 1 thread (bench/test_quality.py, 9 runs): 0.733-0.753; bound 0.85
    check_quality("run: mean of last 3 / first 3 losses over 20 steps", (sum(losses[-3:]) / 3) / (sum(losses[:3]) / 3), below=0.85)


def test_lr_scale_sets_per_part_learning_rates(build_tiny):
    from vlmkit.config import StageConfig
    from vlmkit.training.trainer import _param_groups

    model, _ = build_tiny()
    stage = StageConfig(policy={"vision": "full", "connector": "full", "language": "full"}, lr=1e-3, lr_scale={"vision": 3, "connector": 0.5})
    groups = _param_groups(list(model.named_parameters()), stage)
    lrs = {}
    for g in groups:
        for p in g["params"]:
            for name, part in model.parts().items():
                if any(p is q for q in part.parameters()):
                    lrs.setdefault(name, set()).add(g["lr"])
    assert lrs == {"vision": {3e-3}, "connector": {5e-4}, "language": {1e-3}}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_bf16_run_after_fp32_run_in_one_process(llava_data, tmp_path):
    fp32 = recipe(llava_data, tmp_path / "fp32", max_steps=3)
    bf16 = recipe(llava_data, tmp_path / "bf16", max_steps=3)
    bf16.train.precision = "bf16"
    for cfg in (fp32, bf16):
        cfg.stages = cfg.stages[:1]
        run_training(cfg, evaluate=False)
    a, b = losses_of(tmp_path / "fp32", "align"), losses_of(tmp_path / "bf16", "align")
    assert len(b) == 3 and all(l == l and l < 20 for l in b)
    assert a != b and a[0] == pytest.approx(b[0], rel=0.05)  # autocast changed the arithmetic, not the model


@pytest.mark.parametrize("added_tokens", [0, 1])
def test_lora_adapters_carry_the_embeddings_only_when_they_were_resized(tmp_path, added_tokens, recwarn):
    """A pretrained LM grown by the tokenizer's added tokens (e.g. ``<image>``) saves its embeddings with
    the adapters, so they apply to the original checkpoint; an unchanged vocabulary saves only LoRA weights.
    The choice is made without asking peft's "auto" (which reads the base config, possibly from the Hub)."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmkit.models.language.families import build_language_model
    from vlmkit.training.lora import apply_lora

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    language = build_language_model("llama", str(tmp_path / "base"), {}, vocab_size=50 + added_tokens)
    assert language.embeddings_resized is bool(added_tokens)
    assert language.hf_model.get_input_embeddings().num_embeddings == 50 + added_tokens
    apply_lora(language, LoraSettings(r=2, alpha=4, dropout=0.0), ("q_proj", "v_proj"))
    save_lora(language, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    embedding_rows = sorted(s[0] for k, s in shapes.items() if "embed_tokens" in k or "lm_head" in k)
    assert any("lora_A" in k for k in shapes)
    assert embedding_rows == ([51, 51] if added_tokens else [])  # input embeddings and the LM head
    assert not [w for w in recwarn if "save_embedding_layers" in str(w.message)]


def test_lr_follows_linear_warmup_then_cosine_to_the_floor(llava_data, tmp_path):
    out = tmp_path / "run"
    cfg = recipe(llava_data, out, max_steps=10, warmup_ratio=0.2, min_lr_ratio=0.1, lr=1e-2)
    cfg.stages = cfg.stages[:1]
    run_training(cfg, evaluate=False)
    lrs = [r["lr"] for r in map(json.loads, (out / "stages" / "align" / "metrics.jsonl").read_text().splitlines())]
    # warmup = round(0.2 * 10) = 2 steps: the lr after step s is 1e-2 * s / 2 up to the peak at s = 2; then a
    # half cosine over the remaining 8 steps from the peak down to the floor 0.1 * 1e-2, reached at s = 10
    expected = [1e-2 * s / 2 if s <= 2 else 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8))) for s in range(1, 11)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[1] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)


def test_rows_that_fail_at_encoding_are_skipped_counted_and_logged(llava_data, tmp_path, caplog):
    (llava_data.parent / "img" / "blue1.png").write_bytes(b"not a png at all")  # decodes only when encoded
    caplog.set_level("INFO", logger="vlmkit")
    cfg = recipe(llava_data, tmp_path / "run", max_steps=4, batch_size=4)  # 16 rows: one epoch
    cfg.stages = cfg.stages[:1]
    cfg.stages[0].data.skip_bad_rows = True
    summary = run_training(cfg, evaluate=False)
    assert summary.stages["align"]["skipped"] == 1
    assert summary.stages["align"]["samples"] == 15
    assert any("skipped 1 bad sample(s)" in r.getMessage() for r in caplog.records)
    strict = recipe(llava_data, tmp_path / "strict", max_steps=4, batch_size=4)
    strict.stages = strict.stages[:1]
    with pytest.raises(Exception, match=r"blue1\.png could not be decoded"):
        run_training(strict, evaluate=False)
