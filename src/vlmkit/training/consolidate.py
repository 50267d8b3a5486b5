"""``vlmkit checkpoint consolidate``: a resumable checkpoint, written by any number of processes and
any strategy, as an ordinary model folder (safetensors, loadable with ``vlmkit.load``, exportable).

The model is rebuilt as the run built it (its seeded initialisation and the outputs of the stages
before the checkpoint's), the stage's policy is applied (so LoRA adapters are in place), the
checkpoint's trainable tensors are loaded (``torch.distributed.checkpoint`` reassembles FSDP shards
on one process) and LoRA adapters are merged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlmkit.config import ConfigError
from vlmkit.training.checkpoint import list_checkpoints, load_model_tensors, read_trainer_state
from vlmkit.training.lora import merge_lora
from vlmkit.training.policy import apply_policy

log = logging.getLogger("vlmkit")


def find_checkpoint(run_dir: Path, stage: str | None, step: int | None) -> tuple[str, Path]:
    """``(stage name, checkpoint folder)``: the given one, or the newest checkpoint of the latest
    stage that has any.

    Raises:
        ConfigError: no such stage, no checkpoint, or no checkpoint at ``step`` (lists those there are).
    """
    from vlmkit.training.run import read_run_recipe

    recipe = read_run_recipe(run_dir)
    names = [s.name for s in recipe.stages]
    if stage is not None and stage not in names:
        raise ConfigError(f"{run_dir}: unknown stage {stage!r}; stages: {', '.join(names)}")
    candidates = [stage] if stage else list(reversed(names))
    for name in candidates:
        found = list_checkpoints(run_dir / "stages" / name / "checkpoints")
        if not found:
            continue
        if step is None:
            return name, found[-1]
        for path in found:
            if int(path.name.split("-")[1]) == step:
                return name, path
        raise ConfigError(f"stage {name!r} of {run_dir} has no checkpoint at step {step}; it has: "
                          f"{', '.join(p.name for p in found)}")
    where = f"stage {stage!r}" if stage else "any stage"
    raise ConfigError(f"{run_dir}: {where} has no complete checkpoint (train.save_every writes them during a stage)")


def consolidate(run_dir: str | Path, stage: str | None = None, step: int | None = None, output: str | Path | None = None) -> Path:
    """Write the model of a checkpoint of ``run_dir`` as a vlmkit model folder; returns its path
    (default ``RUN/model-<stage>-step-<N>``). One process; the output is written atomically.

    Raises:
        ConfigError: see :func:`find_checkpoint`; the output folder exists.
        CheckpointError: the checkpoint does not fit the run's model (another recipe).
    """
    from vlmkit.formats import save_model
    from vlmkit.training.run import read_run_recipe, restore_model

    run_dir = Path(run_dir)
    name, folder = find_checkpoint(run_dir, stage, step)
    state = read_trainer_state(folder)
    step_done = state["loop"]["step"]
    out = Path(output) if output else run_dir / f"model-{name}-step-{step_done}"
    if out.exists():
        raise ConfigError(f"{out} exists; choose another --output or delete it")
    stage_cfg = read_run_recipe(run_dir).stage(name)
    model, processor, model_cfg = restore_model(run_dir, name, before=True)
    apply_policy(model, stage_cfg.policy, stage_cfg.lora)
    load_model_tensors(folder, model)
    for part in model.parts().values():
        merge_lora(part)
    save_model(model.eval(), processor, model_cfg, out)
    log.info("consolidated %s (stage %r, step %d, written by %d process(es)) -> %s", folder, name, step_done,
             state.get("world_size", 1), out)
    return out
