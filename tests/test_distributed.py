"""Multi-process training on CPU (gloo): every strategy computes what one process computes.

One ``torchrun --nproc-per-node 2`` launch runs all the jobs (tests/launch_helpers.py), so the
start-up is paid once; each test then compares one job's run folder with the one-process reference
trained in this process: per-step losses and final weights within 1e-5, with accumulation 1 and 2,
for a stage that trains the tower and the connector and a LoRA stage. The stage data has 18 rows
and a global batch of 8, so each epoch ends with a short batch of 2 whose share is empty on some
micro-steps (a target-free filler keeps the processes in step).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_VISION, tiny_recipe_dict, write_llava_data
import processes
from processes import free_port, torchrun
from vlmkit.config import load_recipe
from vlmkit.training.checkpoint import list_checkpoints, read_trainer_state
from vlmkit.training.run import run_training

HERE = Path(__file__).parent
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
EVAL = ("eval.task=easyvqa", "eval.limit=12", "eval.batch_size=4", "eval.max_new_tokens=2")
STEPS = {"align": 4, "instruct": 3}


def recipe_dict(data: Path, out: Path) -> dict:
    r = tiny_recipe_dict(data, out)
    # a ViT without attention biases: the gradient of a key bias is zero in exact arithmetic (softmax
    # ignores a shift shared by all keys), so it is rounding noise, which Adam scales up to steps of
    # +-lr; its value would then depend on the reduction order rather than on the arithmetic
    r["model"]["vision"] = {"encoder": "vit", "config": {**TINY_VISION["vit"], "qkv_bias": False}, "image_size": 32,
                            "feature_layer": -2}
    r["train"]["threads"] = 1
    align, instruct = r["stages"]
    align.update(policy={"vision": "full", "connector": "full"}, batch_size=8, max_steps=STEPS["align"])
    instruct.update(batch_size=8, max_steps=STEPS["instruct"])
    for stage in (align, instruct):
        stage["data"]["limit"] = 18
        # AdamW's step is about lr x g / (|g| + eps), whatever the size of g: for the few elements whose
        # gradient is tiny, the default eps of 1e-8 turns a difference in the last bits of the summation
        # order into steps up to 1e-5 apart (9.9e-6 at seed 1 with default kernels; 5e-6 with eps 1e-6).
        # With 1e-4 such elements barely move, and the comparison measures the arithmetic of the split,
        # not Adam's amplification of rounding.
        stage["eps"] = 1e-4
    return r


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The reference (one process, in this process) and every two-process job, run once."""
    root = tmp_path_factory.mktemp("dist")
    data = write_llava_data(root / "data", per_color=5)
    recipe_file = root / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_dict(data, root / "unused")))
    reference = root / "reference"
    run_training(load_recipe(str(recipe_file), [f"train.output_dir={reference}"]), evaluate=False)
    # the same from pretrained folders (a tower and a language model saved as transformers writes them)
    pretrained_file = root / "pretrained.yaml"
    pretrained_file.write_text(yaml.safe_dump(pretrained_recipe_dict(data, root)))
    reference_pretrained = root / "reference-pretrained"
    run_training(load_recipe(str(pretrained_file), [f"train.output_dir={reference_pretrained}"]), evaluate=False)

    def train(name: str, *overrides: str, env: dict | None = None) -> dict:
        evaluate = [] if any(o.startswith("eval.") for o in overrides) else ["--no-eval"]
        return {"argv": ["train", str(recipe_file), f"train.output_dir={root / name}", *evaluate, *overrides], "env": env or {}}

    accum2 = ("stages.align.micro_batch_size=2", "stages.instruct.micro_batch_size=2")
    jobs = {
        "ddp-a1": train("ddp-a1", "train.strategy=ddp"),
        "ddp-a2": train("ddp-a2", "train.strategy=ddp", *accum2),
        # with the evaluation at the end of the run, shared by the two processes
        "fsdp-a1": train("fsdp-a1", "train.strategy=fsdp", *EVAL),
        "fsdp-a2": train("fsdp-a2", "train.strategy=fsdp", *accum2),
        "fsdp-checkpointing-a2": train("fsdp-checkpointing-a2", "train.strategy=fsdp", "train.gradient_checkpointing=true", *accum2),
        "fsdp-bf16": train("fsdp-bf16", "train.strategy=fsdp", "train.precision=bf16"),
        # two "nodes" of one process each: parameters replicated across nodes, sharded within (HSDP)
        "fsdp-hybrid": train("fsdp-hybrid", "train.strategy=fsdp", "train.fsdp.sharding=hybrid", env={"LOCAL_WORLD_SIZE": "1"}),
        "fsdp-stop": {"recipe": str(recipe_file), "stop_after": 2,
                      "overrides": [f"train.output_dir={root / 'fsdp-stop'}", "train.strategy=fsdp", "train.save_every=1"]},
        "bad-batch": train("bad-batch", "train.strategy=ddp", "stages.align.batch_size=7"),
        # rank 1 builds the pretrained model without reading weights and gets rank 0's
        "fsdp-pretrained": {"argv": ["train", str(pretrained_file), f"train.output_dir={root / 'fsdp-pretrained'}", "--no-eval",
                                     "train.strategy=fsdp"], "record_loading": True},
        "ddp-every-rank-reads": {"argv": ["train", str(pretrained_file), f"train.output_dir={root / 'ddp-every-rank-reads'}",
                                          "--no-eval", "train.strategy=ddp", "train.rank0_loading=false"], "record_loading": True},
    }
    if HAS_DEEPSPEED:
        jobs["deepspeed-zero2-a2"] = train("deepspeed-zero2-a2", "train.strategy=deepspeed", "train.deepspeed=zero2", *accum2)
        jobs["deepspeed-zero3-a1"] = train("deepspeed-zero3-a1", "train.strategy=deepspeed", "train.deepspeed=zero3")
    jobs_file = root / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    done = torchrun([str(HERE / "launch_helpers.py"), "jobs", str(jobs_file)], timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    results = json.loads((root / "jobs.json.result").read_text())
    loading = [json.loads((root / f"jobs.json.loading.rank{r}").read_text()) for r in range(2)]
    return {"root": root, "recipe": recipe_file, "reference": reference, "reference-pretrained": reference_pretrained,
            "results": results, "loading": loading, "output": done.stdout + done.stderr}


def pretrained_recipe_dict(data: Path, root: Path) -> dict:
    """:func:`recipe_dict` with its tower and language model read from folders saved in ``root``."""
    import transformers

    r = recipe_dict(data, root / "unused")
    torch.manual_seed(1)
    vit = transformers.ViTModel(transformers.ViTConfig(**r["model"]["vision"].pop("config")))
    vit.save_pretrained(root / "vit")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**r["model"]["language"].pop("config"), vocab_size=280))
    llama.save_pretrained(root / "llama")  # fewer rows than the run's tokenizer: resized on load
    r["model"]["vision"]["pretrained"] = str(root / "vit")
    r["model"]["language"]["pretrained"] = str(root / "llama")
    return r


def losses(run: Path, stage: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "stages" / stage / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run / "model").rglob("*.safetensors")):
        out |= {f"{f.relative_to(run)}:{k}": v for k, v in load_file(str(f)).items()}
    return out


def assert_same_training(run: Path, reference: Path) -> None:
    for stage, steps in STEPS.items():
        got, want = losses(run, stage), losses(reference, stage)
        assert len(got) == steps, f"{stage}: {len(got)} metrics lines for {steps} steps (written by more than one process?)"
        assert got == pytest.approx(want, abs=1e-5), stage
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


JOBS = ["ddp-a1", "ddp-a2", "fsdp-a1", "fsdp-a2", "fsdp-checkpointing-a2", "fsdp-hybrid",
        pytest.param("deepspeed-zero2-a2", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed")),
        pytest.param("deepspeed-zero3-a1", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed"))]


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS)
def test_two_processes_train_what_one_process_trains(world, job):
    assert world["results"][job] == 0, world["output"][-4000:]
    run = world["root"] / job
    assert_same_training(run, world["reference"])
    log = (run / "train.log").read_text()
    # every file once, by the main process: one log line per event, one metrics line per step
    assert log.count("saved the model to") == 1 and log.count("stage 'align' done") == 1
    accumulation = 2 if job.endswith("a2") else 1
    micro = 4 // accumulation
    assert f"world size 2, global batch 8 = micro-batch {micro} per device x 2 process(es) x {accumulation} accumulation step(s)" in log
    strategy = job.split("-")[0]
    assert f"{strategy} strategy" in log
    state = read_trainer_state(list_checkpoints(run / "stages" / "instruct" / "checkpoints")[-1])
    assert state["world_size"] == 2 and state["strategy"] == strategy and state["accumulation"] == accumulation


@pytest.mark.slow
def test_only_rank_0_reads_pretrained_weights_and_the_run_equals_one_process(world):
    """``train.rank0_loading`` (the default): rank 1 builds the pretrained tower and language model on
    the meta device from their configs, reads no weights, and trains what one process trains; with
    the option off, every process reads them."""
    for job in ("fsdp-pretrained", "ddp-every-rank-reads"):
        assert world["results"][job] == 0, world["output"][-4000:]
        assert_same_training(world["root"] / job, world["reference-pretrained"])
    rank0, rank1 = (loading["fsdp-pretrained"] for loading in world["loading"])
    assert rank0 == {"reads": 2, "meta": False} and rank1 == {"reads": 0, "meta": True}
    assert [loading["ddp-every-rank-reads"] for loading in world["loading"]] == [{"reads": 2, "meta": False}] * 2
    assert "rank 0 read the weights; the other 1 process(es) built the model without them" in (
        world["root"] / "fsdp-pretrained" / "train.log").read_text()


@pytest.mark.slow
def test_a_two_process_checkpoint_consolidates_and_resumes_on_one_process(world, tmp_path):
    from vlmkit.formats import load_model
    from vlmkit.training.consolidate import consolidate

    assert world["results"]["fsdp-stop"] == "stopped"
    run = world["root"] / "fsdp-stop"
    found = list_checkpoints(run / "stages" / "align" / "checkpoints")
    assert [p.name for p in found] == ["step-0000001", "step-0000002"]
    state = read_trainer_state(found[-1])
    assert state["world_size"] == 2 and state["strategy"] == "fsdp"
    # each process wrote its own shard of the FSDP-sharded tensors
    assert len(list((found[-1] / "state").glob("*.safetensors"))) == 2

    # consolidated on one process: an ordinary model folder with the step-2 weights
    folder = consolidate(run, output=tmp_path / "step2")
    model, _ = load_model(folder)
    reference, _ = load_model(world["reference"] / "model")
    assert not torch.allclose(model.connector.mlp[0].weight, reference.connector.mlp[0].weight)

    run_training(load_recipe(str(world["recipe"]), [f"train.output_dir={run}", "train.save_every=1"]), evaluate=False)
    assert_same_training(run, world["reference"])


@pytest.mark.slow
def test_a_global_batch_that_does_not_divide_stops_every_process_before_training(world):
    assert world["results"]["bad-batch"] == 2
    assert "stages.align.batch_size=7 (the global batch) does not divide over 2 processes" in world["output"]
    assert not (world["root"] / "bad-batch" / "stages").exists()


@pytest.mark.slow
def test_the_evaluation_after_a_two_process_run_is_shared_and_equals_one_process(world, tmp_path):
    from vlmkit.cli import main

    run = world["root"] / "fsdp-a1"
    rows = [json.loads(line) for line in (run / "eval" / "easyvqa" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    assert not list((run / "eval" / "easyvqa").glob("predictions.rank*.jsonl"))
    recorded = json.loads((run / "eval.json").read_text())
    assert (run / "train.log").read_text().count("easy-VQA test accuracy") == 1
    assert main(["eval", "--model", str(run / "model"), "--task", "easyvqa", "--limit", "12", "--batch-size", "4",
                 "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    alone = {r["id"]: r["prediction"] for r in map(json.loads, (tmp_path / "easyvqa" / "predictions.jsonl").read_text().splitlines())}
    assert {r["id"]: r["prediction"] for r in rows} == alone
    assert recorded["accuracy"] == json.loads((tmp_path / "easyvqa" / "scores.json").read_text())["accuracy"]


@pytest.mark.slow
def test_fsdp_with_bf16_mixed_precision_keeps_fp32_weights_and_close_losses(world):
    assert world["results"]["fsdp-bf16"] == 0
    run = world["root"] / "fsdp-bf16"
    for stage in STEPS:
        assert losses(run, stage) == pytest.approx(losses(world["reference"], stage), rel=2e-3), stage
    trained = weights(run)
    assert {v.dtype for v in trained.values()} == {torch.float32}  # bf16 is the compute dtype, not the stored one
    assert "mp_policy" not in (run / "train.log").read_text()


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_training(world):
    """``accelerate launch --use_fsdp`` (the recipe's strategy is auto: accelerate's flag picks FSDP)."""
    run = world["root"] / "accelerate"
    done = processes.run([sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                      "-m", "vlmkit", "train", str(world["recipe"]), f"train.output_dir={run}", "--no-eval"], timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "fsdp strategy, world size 2" in (run / "train.log").read_text()
    assert_same_training(run, world["reference"])
