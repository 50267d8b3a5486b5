"""Resumable training checkpoints on ``torch.distributed.checkpoint``, stored as safetensors (no pickles).

A checkpoint folder ``step-0000012/`` holds::

    state/*.safetensors    the trainable parameters (with the buffers of the parts that train) and the
                           optimizer state, keyed by parameter name; each process writes the shards it
                           holds (FSDP) or one process writes what all hold (DDP, one process)
    rng-<rank>.json        each process's random number generator states
    trainer_state.json     written last: loop position, scheduler, optimizer groups, how the run was split
                           (world size, micro-batch, accumulation) and a signature of the trainable tensors

Because tensors are stored by name with their offsets, a checkpoint loads into any number of
processes and any strategy (2-process FSDP -> 1 process, DDP -> FSDP ...). Writes go to a hidden
``.step-N.partial`` folder that is renamed into place once every process has finished, so a crash
(even SIGKILL) during a write leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmkit import distributed as dist
from vlmkit.fileio import fsync_tree

log = logging.getLogger("vlmkit")

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_DIR = "state"
TRAINER_FILE = "trainer_state.json"
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not belong to this run; the message says which and why."""


@dataclass
class LoopState:
    """Where the training loop is: optimizer steps done, epoch, global batches done in the epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    skipped: int = 0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes, by name: the parameters that require grad, and the persistent buffers
    of every top-level part (child module) that has one of them. Buffers such as BatchNorm running
    statistics change in training mode although no gradient reaches them, also in layers whose
    output the model does not use."""
    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    training_parts = {name.split(".", 1)[0] for name in state}
    for name, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, nn.Parameter) and name.split(".", 1)[0] in training_parts:
            state[name] = value
    return state


def signature(state: dict[str, torch.Tensor]) -> str:
    """A hash of the names and shapes of ``state`` (tells a checkpoint of another model or policy)."""
    digest = hashlib.sha1()
    for name in sorted(state):
        digest.update(f"{name}:{tuple(state[name].shape)}\n".encode())
    return digest.hexdigest()[:16]


def _flatten(model_state: dict[str, Any], optim_state: dict[str, Any], names: set[str]) -> dict[str, torch.Tensor]:
    flat = {MODEL_PREFIX + k: v for k, v in model_state.items() if k in names}
    for fqn, values in optim_state.get("state", {}).items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                flat[f"{OPTIM_PREFIX}{fqn}/{key}"] = value
    return flat


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    npst = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "python": [py[0], list(py[1]), py[2]],
             "numpy": [npst[0], npst[1].tolist(), *npst[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(dist.device()).tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), dist.device())
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))


def save_checkpoint(folder: str | Path, strategy, loop: LoopState, info: dict[str, Any]) -> Path:
    """Write a resumable checkpoint of ``strategy``'s model and optimizer to ``folder``. Collective:
    every process calls it.

    ``info`` (JSON) is stored in ``trainer_state.json``; it must hold ``signature`` and ``names``
    is derived from the model's trainable state.

    Raises:
        CheckpointError: a process could not write its part (full disk, unwritable folder); the
            partial folder is removed and the previous checkpoint stays the newest.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    folder = Path(folder)
    partial = folder.parent / f".{folder.name}.partial"
    if dist.is_main():
        shutil.rmtree(partial, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    failure = ""
    try:
        (partial / STATE_DIR).mkdir(parents=True, exist_ok=True)
        model_state, optim_state = strategy.state_dicts()
        tensors = _flatten(model_state, optim_state, set(info["names"]))
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(partial / STATE_DIR), save_distributed=True),
                 no_dist=not dist.initialized())
        (partial / f"rng-{dist.rank()}.json").write_text(json.dumps(_rng_state()))
        fsync_tree(partial)
    except (OSError, RuntimeError) as exc:  # DCP raises CheckpointException (a RuntimeError) on every process
        failure = f"{type(exc).__name__}: {exc}"
    if dist.any_process(bool(failure)):
        failures = [f for f in dist.gather_objects(failure) if f]
        if dist.is_main():
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(_write_failure(folder, failures[0] if failures else "another process failed"))
    if dist.is_main():
        try:
            groups = [{k: v for k, v in g.items()} for g in optim_state.get("param_groups", [])]
            state = {"loop": asdict(loop), "scheduler": strategy.scheduler.state_dict(), "param_groups": groups,
                     "world_size": dist.world_size(), **{k: v for k, v in info.items() if k != "names"}}
            (partial / TRAINER_FILE).write_text(json.dumps(state, indent=1, default=_jsonable))
            fsync_tree(partial, files=[partial / TRAINER_FILE])
            old = None
            if folder.exists():
                old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(folder, old)
            os.replace(partial, folder)
            fsync_tree(folder.parent, files=[])
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            failure = ""
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            failure = _write_failure(folder, f"{type(exc).__name__}: {exc}")
    message = dist.broadcast_object(failure)
    if message:
        raise CheckpointError(message)
    return folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_failure(folder: Path, reason: str) -> str:
    free = ""
    try:
        free = f"; {shutil.disk_usage(folder.parent).free / 1e9:.2f} GB free there"
    except OSError:
        pass
    previous = list_checkpoints(folder.parent)
    kept = f"the newest complete checkpoint is still {previous[-1]}" if previous else "no earlier checkpoint of this stage exists"
    return f"could not write checkpoint {folder} ({reason}{free}); {kept}. Free space or fix the folder, then run again to resume"


def read_trainer_state(folder: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint.

    Raises:
        CheckpointError: the folder is not a complete vlmkit checkpoint.
    """
    path = Path(folder) / TRAINER_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} is not a complete vlmkit checkpoint ({path}: {exc})") from None


def check_compatible(folder: str | Path, state: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a checkpoint written for another model, policy, stage or global batch.

    Raises:
        CheckpointError: names the first field that differs, with both values.
    """
    for key, label in (("stage", "stage"), ("signature", "trainable tensors (model or policy)"), ("global_batch", "global batch size")):
        if key in expected and state.get(key) != expected[key]:
            raise CheckpointError(
                f"checkpoint {folder} was written for another {label}: {state.get(key)!r}, this run has {expected[key]!r}; "
                "it belongs to another recipe or model. Use another train.output_dir, or delete the checkpoint to start the stage over"
            )


def load_checkpoint(folder: str | Path, strategy, info: dict[str, Any]) -> LoopState:
    """Restore the model's trainable tensors, the optimizer, the scheduler and this process's RNG from
    ``folder`` (written by any number of processes). Collective. Returns the loop position.

    Raises:
        CheckpointError: the checkpoint belongs to another model, policy, stage or global batch.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = Path(folder)
    state = read_trainer_state(folder)
    check_compatible(folder, state, info)
    model_state, optim_state = strategy.state_dicts()  # templates with this run's sharding (optimizer state initialised)
    names = set(info["names"])
    tensors = _flatten(model_state, optim_state, names)
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / STATE_DIR)), no_dist=not dist.initialized())
    model_state = {k: tensors[MODEL_PREFIX + k] for k in model_state if k in names}
    for fqn, values in optim_state.get("state", {}).items():
        for key in values:
            if f"{OPTIM_PREFIX}{fqn}/{key}" in tensors:
                values[key] = tensors[f"{OPTIM_PREFIX}{fqn}/{key}"]
    saved_groups = state.get("param_groups") or []
    if len(saved_groups) == len(optim_state.get("param_groups", [])):
        for group, saved in zip(optim_state["param_groups"], saved_groups):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k != "params"})
    strategy.load_state_dicts(model_state, optim_state)
    strategy.scheduler.load_state_dict(state["scheduler"])
    rng = folder / f"rng-{dist.rank()}.json"
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    if state.get("world_size", 1) != dist.world_size():
        log.info("checkpoint %s was written by %d process(es); resuming on %d", folder, state.get("world_size", 1), dist.world_size())
    return LoopState(**state["loop"])


def load_model_tensors(folder: str | Path, model: nn.Module) -> None:
    """Load only the model tensors of a checkpoint into ``model`` (one process, no optimizer): what
    ``vlmkit checkpoint consolidate`` does. ``model`` must have the stage's policy applied (LoRA
    adapters in place).

    Raises:
        CheckpointError: the checkpoint's trainable tensors are not the model's.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    folder = Path(folder)
    current = trainable_state(model)
    state = read_trainer_state(folder)
    check_compatible(folder, state, {"signature": signature(current)})
    tensors = {MODEL_PREFIX + k: v.detach() for k, v in current.items()}
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / STATE_DIR)),
             planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    with torch.no_grad():
        for name, value in current.items():
            if tensors[MODEL_PREFIX + name] is not value:
                value.copy_(tensors[MODEL_PREFIX + name])


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints under ``folder`` sorted by step (partial and temporary folders ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := STEP_DIR.match(p.name)) and p.is_dir() and (p / TRAINER_FILE).is_file()]
    return [p for _, p in sorted(found)]


def remove_partial(folder: str | Path) -> list[Path]:
    """Delete what an interrupted checkpoint write left under ``folder``; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".step-") and (".partial" in p.name or ".old-" in p.name)]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
