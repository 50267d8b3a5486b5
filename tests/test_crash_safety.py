"""Crash safety: SIGKILL mid-run and during a checkpoint write, SIGTERM, a full disk, an unwritable
folder, too little free space, a checkpoint of another model, an unknown or unavailable strategy.

Every interrupted run, resumed, must end with the weights and per-step losses of a run never
interrupted; every refusal must come before the first optimizer step and name what is wrong."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict, write_llava_data
from processes import finish, start
from test_distributed import weights
from vlmkit.config import ConfigError, load_recipe
from vlmkit.training.checkpoint import CheckpointError, list_checkpoints
from vlmkit.training.run import run_training

HERE = Path(__file__).parent
STEPS = {"align": 6, "instruct": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = write_llava_data(root / "data")
    r = tiny_recipe_dict(data, root / "unused")
    r["train"].update(threads=1, save_every=1, keep_checkpoints=2)
    for stage in r["stages"]:
        stage["max_steps"] = STEPS[stage["name"]]
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(r))
    reference = root / "reference"
    run_training(load_recipe(str(recipe), [f"train.output_dir={reference}"]), evaluate=False)
    return {"root": root, "recipe": recipe, "reference": reference}


def metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / "stages" / stage / "metrics.jsonl").read_text().splitlines()]


def assert_equals_reference(run: Path, reference: Path) -> None:
    for stage, steps in STEPS.items():
        got, want = metrics(run, stage), metrics(reference, stage)
        assert [r["step"] for r in got] == list(range(1, steps + 1)), stage
        assert [r["loss"] for r in got] == [r["loss"] for r in want], stage
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def vlmkit_child(recipe: Path, out: Path, *faults: str) -> subprocess.Popen:
    return start([sys.executable, str(HERE / "launch_helpers.py"), "faults", *faults, "--",
                  "train", str(recipe), f"train.output_dir={out}", "--no-eval"])


@pytest.mark.slow
def test_sigkill_mid_run_and_during_a_checkpoint_write_then_resume_gives_the_uninterrupted_run(setup):
    run = setup["root"] / "killed"
    ckpts = run / "stages" / "align" / "checkpoints"

    # 1. SIGKILL from outside once step 3's checkpoint is complete (a pause after each step leaves time)
    proc = vlmkit_child(setup["recipe"], run, "--step-delay", "0.5")
    deadline = time.monotonic() + 240
    while not (ckpts / "step-0000003" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 3 in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert finish(proc, 60).returncode == -signal.SIGKILL
    newest = list_checkpoints(ckpts)[-1]
    assert int(newest.name.split("-")[1]) >= 3

    # 2. resumed, then killed while writing its second checkpoint: the tensors are on disk in a hidden
    #    partial folder, which is never taken for a checkpoint; the one before it is the newest
    done = finish(vlmkit_child(setup["recipe"], run, "--kill-at-checkpoint", "2"), 300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    partial = [p for p in ckpts.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and list((partial[0] / "state").glob("*.safetensors"))
    written = int(partial[0].name.split("-")[1].split(".")[0])
    assert int(list_checkpoints(ckpts)[-1].name.split("-")[1]) == written - 1
    from vlmkit.training.consolidate import consolidate

    loaded = consolidate(run, stage="align", output=setup["root"] / "previous")  # the previous checkpoint loads
    assert (loaded / "vlmkit_config.json").is_file()

    # 3. resumed to the end: the leftover is removed and the run equals the uninterrupted one
    done = finish(vlmkit_child(setup["recipe"], run), 300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "left by a checkpoint write that did not finish" in done.stderr
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert_equals_reference(run, setup["reference"])


def test_sigterm_writes_a_checkpoint_and_exits_with_143_then_resumes(setup, monkeypatch, capsys):
    from vlmkit.cli import main
    from vlmkit.training import strategies

    run = setup["root"] / "sigterm"
    step, calls = strategies.Strategy.step, [0]

    def step_then_sigterm(self, max_grad_norm):
        out = step(self, max_grad_norm)
        calls[0] += 1
        if calls[0] == 8:  # the second step of the instruct stage
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(strategies.Strategy, "step", step_then_sigterm)
    argv = ["train", str(setup["recipe"]), f"train.output_dir={run}", "train.save_every=0", "--no-eval"]
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert "stage 'instruct' stopped by SIGTERM after step 2 of 4" in err and "run the same command again to resume" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    assert [p.name for p in list_checkpoints(run / "stages" / "instruct" / "checkpoints")] == ["step-0000002"]
    monkeypatch.undo()
    assert main(argv) == 0
    assert_equals_reference(run, setup["reference"])


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(setup, monkeypatch):
    import torch.distributed.checkpoint as dcp

    run = setup["root"] / "full-disk"
    save, calls = dcp.save, [0]

    def save_until_the_disk_is_full(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", save_until_the_disk_is_full)
    cfg = load_recipe(str(setup["recipe"]), [f"train.output_dir={run}"])
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-0000003 \(OSError: \[Errno 28\] No space left"
                                              r".*the newest complete checkpoint is still .*step-0000002"):
        run_training(cfg, evaluate=False)
    ckpts = run / "stages" / "align" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001", "step-0000002"]  # no partial folder left
    monkeypatch.undo()
    run_training(cfg, evaluate=False)  # free space again: resumes from step 2
    assert_equals_reference(run, setup["reference"])


def test_too_little_free_space_is_refused_before_the_first_step(setup, monkeypatch):
    run = setup["root"] / "no-space"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    with pytest.raises(ConfigError, match=r"no-space has 0\.00 GB free, but this run needs about .* GB .*3 checkpoints"):
        run_training(load_recipe(str(setup["recipe"]), [f"train.output_dir={run}"]), evaluate=False)
    assert not (run / "stages").exists()


def test_an_unwritable_output_folder_is_refused_before_anything_runs(setup):
    blocker = setup["root"] / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"train\.output_dir=.*a-file/run cannot be written .*choose a writable folder"):
        run_training(load_recipe(str(setup["recipe"]), [f"train.output_dir={blocker / 'run'}"]), evaluate=False)


def test_a_checkpoint_of_another_model_is_refused_before_any_step(setup):
    run = setup["root"] / "other-model"
    cfg = load_recipe(str(setup["recipe"]), [f"train.output_dir={run}"])
    run_training(cfg, only_stages=["align"], evaluate=False)
    # a checkpoint of another recipe's stage (LoRA of rank 4 + the connector) put where this run's
    # instruct stage (here: LoRA of rank 8) looks for its own
    source = list_checkpoints(setup["reference"] / "stages" / "instruct" / "checkpoints")[-1]
    shutil.copytree(source, run / "stages" / "instruct" / "checkpoints" / source.name)
    changed = load_recipe(str(setup["recipe"]), [f"train.output_dir={run}", "stages.instruct.lora.r=8"])
    (run / "config.yaml").unlink()  # only the checkpoint tells the two apart
    with pytest.raises(CheckpointError, match=r"was written for another trainable tensors \(model or policy\)"):
        run_training(changed, evaluate=False)
    assert not (run / "stages" / "instruct" / "metrics.jsonl").exists()


def test_unknown_and_unavailable_strategies_are_refused(setup, monkeypatch):
    with pytest.raises(ConfigError, match=r"train\.strategy='zero' is not valid; choose one of 'auto', 'none', 'ddp', 'fsdp', 'deepspeed'"):
        load_recipe(str(setup["recipe"]), ["train.strategy=zero"])
    import builtins

    real_import = builtins.__import__

    def no_deepspeed(name, *args, **kwargs):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ImportError("No module named 'deepspeed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    run = setup["root"] / "no-deepspeed"
    with pytest.raises(ConfigError, match=r"train\.strategy=deepspeed needs DeepSpeed .*pip install 'vlmkit\[deepspeed\]', or use fsdp"):
        run_training(load_recipe(str(setup["recipe"]), [f"train.output_dir={run}", "train.strategy=deepspeed"]), evaluate=False)
    assert not (run / "stages" / "align" / "metrics.jsonl").exists()
    from vlmkit.training import strategies

    monkeypatch.setattr(strategies, "FSDP_API", ("torch.distributed.fsdp", "no_such_api"))
    with pytest.raises(ConfigError, match=r"train\.strategy=fsdp needs FSDP2 .*this torch is"):
        strategies.FSDPStrategy.check_available()
