"""One training loop for every stage, on one process or many (``torchrun`` / ``accelerate launch``).

AdamW (no decay on biases and norms), linear warmup + cosine decay, gradient accumulation,
fp32/bf16 autocast, optional gradient checkpointing, gradient clipping, a progress bar with
loss / lr / samples per second, one JSONL record per optimizer step, periodic resumable checkpoints
and a loss-curve PNG. The processes share the work through a strategy
(:mod:`vlmkit.training.strategies`: none, ddp, fsdp, deepspeed).

Batch semantics do not depend on the machine count: ``batch_size`` is the global batch of one
optimizer step; each process takes ``accumulation`` micro-batches of it; the loss is the mean over
every target token of the global batch (each process back-propagates its summed token losses
divided by the global token count), so per-step losses and weights are those of one process
running the whole batch at once, up to float rounding.

Files (metrics, plots, the policy table) are written by the main process only. SIGTERM makes the
loop finish its step, write a checkpoint and raise :class:`TrainingStopped`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from vlmkit import distributed as dist
from vlmkit.config import StageConfig, TrainConfig
from vlmkit.data.dataset import Collator, ConversationDataset, GlobalBatchSampler
from vlmkit.data.sources import DataError
from vlmkit.models.vlm import TARGET_KEYS, VisionLanguageModel
from vlmkit.training.checkpoint import (
    LoopState, list_checkpoints, load_checkpoint, prune_checkpoints, remove_partial, save_checkpoint, signature, trainable_state,
)
from vlmkit.training.metrics import MetricsLog, plot_loss
from vlmkit.training.policy import apply_policy, format_policy, set_train_modes
from vlmkit.training.strategies import autocast, resolve_strategy

log = logging.getLogger("vlmkit")


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after``: the loop stopped early on purpose (tests simulate a crash with it)."""


class TrainingStopped(TrainingInterrupted):
    """SIGTERM asked the run to stop; a checkpoint of the last finished step was written first."""

    def __init__(self, message: str, checkpoint: Path | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class StageResult:
    """What a finished stage reports, and the plain model it leaves (strategies that shard the model
    during the stage hand back a gathered copy)."""

    steps: int
    final_loss: float
    seconds: float
    samples: int
    skipped: int
    losses: list[float] = field(default_factory=list)
    model: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class BatchPlan:
    """How a stage's global batch is split on this launch."""

    global_batch: int
    micro_batch: int
    accumulation: int
    processes: int

    def describe(self) -> str:
        return (f"world size {self.processes}, global batch {self.global_batch} = micro-batch {self.micro_batch} per device "
                f"x {self.processes} process(es) x {self.accumulation} accumulation step(s)")


def batch_plan(stage: StageConfig, processes: int | None = None) -> BatchPlan:
    """The stage's split on ``processes`` (default: this launch's world size).

    Raises:
        ConfigError: the global batch does not divide (see :meth:`StageConfig.micro_and_accumulation`).
    """
    processes = processes or dist.world_size()
    micro, accumulation = stage.micro_and_accumulation(processes)
    return BatchPlan(stage.batch_size, micro, accumulation, processes)


def _param_groups(params: list[tuple[str, torch.nn.Parameter]], stage: StageConfig) -> list[dict[str, Any]]:
    """AdamW groups: per part (its lr scale) x decay / no decay (biases and norms are not decayed), with
    the stage's betas and epsilon."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in params:
        part = name.split(".", 1)[0]
        decays = p.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((part, decays), []).append(p)
    return [
        {"params": ps, "weight_decay": stage.weight_decay if decays else 0.0, "lr": stage.lr * stage.lr_scale.get(part, 1.0),
         "betas": tuple(stage.betas), "eps": stage.eps}
        for (part, decays), ps in groups.items()
    ]


def total_steps(stage: StageConfig, dataset_size: int) -> int:
    """Optimizer steps the stage runs: ``max_steps``, or ``epochs`` passes of global batches (the last
    batch of an epoch may be short). The same on any number of processes."""
    if stage.max_steps:
        return stage.max_steps
    per_epoch = math.ceil(dataset_size / stage.batch_size)
    return max(1, math.ceil(stage.epochs * per_epoch))


def enable_gradient_checkpointing(model: VisionLanguageModel) -> None:
    """Turn on activation recomputation in every part that supports it, frozen parts included.

    transformers recomputes a layer only in training mode, but vlmkit keeps frozen parts in eval mode
    (no dropout, no BatchNorm drift). A frozen language model behind a trained connector (LLaVA's
    stage 1) still passes gradients back, and would keep every layer's activations: its layers are
    checkpointed here in eval mode too (:func:`_checkpointed_forward`)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for hf in (model.vision.tower, model.language.hf_model):
        if getattr(hf, "supports_gradient_checkpointing", False):
            enable = getattr(hf, "activation_checkpointing_enable", None)  # transformers' name since late 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for layer in hf.modules():
                if isinstance(layer, GradientCheckpointingLayer) and "forward" not in vars(layer):
                    layer.forward = types.MethodType(_checkpointed_forward, layer)
    fusion_enable = getattr(model.fusion, "gradient_checkpointing_enable", None)  # cross-attention blocks run in hooks
    if fusion_enable is not None:
        fusion_enable()
    model.language.hf_model.config.use_cache = False


def _checkpointed_forward(self, *args: Any, **kwargs: Any) -> Any:
    """A layer's forward, recomputed in backward also in eval mode (a frozen part that gradients pass
    through); in training mode transformers' own wrapper checkpoints, without gradients nothing does."""
    forward = type(self).forward
    if self.gradient_checkpointing and not self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def mask_targets(batch: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``batch`` with every target ignored: it runs the forward and backward passes (so all
    processes take part in the collectives) and contributes nothing to loss or gradients."""
    out = dict(batch)
    for key in TARGET_KEYS:
        if out.get(key) is not None:
            out[key] = torch.full_like(out[key], -100)
    return out


class _Filler:
    """The target-free micro-batch used where a process's share of a global batch is empty (a short
    last batch, or every row skipped as bad): the dataset's first encodable sample, masked."""

    def __init__(self, dataset: ConversationDataset, collator: Collator):
        self.dataset, self.collator, self._batch = dataset, collator, None

    def get(self) -> dict[str, Any]:
        if self._batch is None:
            for index in range(len(self.dataset)):
                item = self.dataset[index]
                if item is not None:
                    batch = self.collator([item])
                    batch.pop("num_skipped"), batch.pop("num_samples")
                    self._batch = mask_targets(batch)
                    break
            else:
                raise DataError("no sample of the stage's data could be encoded")
        return self._batch


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An event set by SIGTERM while the body runs (main thread only; elsewhere never set)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_stage(
    model: VisionLanguageModel,
    dataset: ConversationDataset,
    stage: StageConfig,
    train: TrainConfig,
    folder: str | Path,
    stop_after: int | None = None,
    num_workers: int = 0,
) -> StageResult:
    """Train ``model`` on ``dataset`` as ``stage`` declares; resume from ``folder/checkpoints`` if present.

    Collective under a launcher: every process calls it with the same arguments.

    Args:
        model: on this process's device.
        folder: the stage folder (metrics.jsonl, checkpoints/, loss.png, policy.txt).
        stop_after: stop with :class:`TrainingInterrupted` after this many optimizer steps in this call.
        num_workers: DataLoader worker processes.

    Returns:
        :class:`StageResult` with per-step losses of this call and the trained plain model.

    Raises:
        ConfigError: the global batch does not divide over the processes, or the strategy is unavailable.
        CheckpointError: a checkpoint of another model or recipe, or one that cannot be written.
        TrainingStopped: SIGTERM (after the checkpoint).
    """
    folder = Path(folder)
    plan = batch_plan(stage)
    strategy = resolve_strategy(train)
    if dist.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    reports = apply_policy(model, stage.policy, stage.lora)
    policy_text = format_policy(stage.name, reports)
    log.info(policy_text)
    log.info("stage %r: %s strategy, %s", stage.name, strategy.name, plan.describe())
    if dist.is_main():
        (folder / "policy.txt").write_text(policy_text + "\n")
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    state = trainable_state(model)
    info = {"stage": stage.name, "signature": signature(state), "names": sorted(state), "strategy": strategy.name,
            "global_batch": plan.global_batch, "micro_batch": plan.micro_batch, "accumulation": plan.accumulation}
    del state
    steps = total_steps(stage, len(dataset))
    strategy.prepare(
        model, lambda named: _param_groups(named, stage),
        lambda opt: get_cosine_with_min_lr_schedule_with_warmup(
            opt, num_warmup_steps=int(round(stage.warmup_ratio * steps)), num_training_steps=steps, min_lr_rate=stage.min_lr_ratio),
        plan.micro_batch, plan.accumulation, stage.max_grad_norm,
    )

    metrics = MetricsLog(folder / "metrics.jsonl")
    ckpt_dir = folder / "checkpoints"
    loop = LoopState()
    if dist.is_main():
        for leftover in remove_partial(ckpt_dir):
            log.warning("removed %s, left by a checkpoint write that did not finish", leftover)
    existing = list_checkpoints(ckpt_dir)
    dist.barrier()
    if existing:
        loop = load_checkpoint(existing[-1], strategy, info)
        log.info("stage %r: resumed from %s (step %d of %d)", stage.name, existing[-1], loop.step, steps)
        if dist.is_main():
            metrics.truncate_after(loop.step)
    elif dist.is_main() and metrics.path.exists():
        metrics.path.unlink()

    collator = Collator(dataset.processor, "right")
    filler = _Filler(dataset, collator)
    bar = tqdm(total=steps, initial=loop.step, desc=stage.name, disable=not (train.progress and dist.is_main()), dynamic_ncols=True)
    losses: list[float] = []
    started = time.perf_counter()
    window_start, window_samples = time.perf_counter(), 0
    steps_this_call = 0
    device = dist.device()
    set_train_modes(model, stage.policy)

    def checkpoint() -> Path:
        path = save_checkpoint(ckpt_dir / f"step-{loop.step:07d}", strategy, loop, info)
        if dist.is_main():
            prune_checkpoints(ckpt_dir, train.keep_checkpoints)
        return path

    with _sigterm_flag() as sigterm:
        while loop.step < steps:
            sampler = GlobalBatchSampler(len(dataset), plan.global_batch, plan.accumulation, train.seed, loop.epoch,
                                         plan.processes, dist.rank())
            # the loader's own generator: creating its iterator must not draw from the global RNG, whose
            # state a checkpoint restores for dropout (a resumed run creates an iterator mid-epoch)
            loader: Any = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                                     generator=torch.Generator().manual_seed(sampler.draw_seed))
            if loop.batch_in_epoch:
                from accelerate import skip_first_batches

                loader = skip_first_batches(loader, loop.batch_in_epoch * plan.accumulation)
            micro_batches = iter(loader)
            while loop.batch_in_epoch < sampler.steps_per_epoch() and loop.step < steps:
                if dist.any_process(sigterm.is_set()):
                    bar.close()
                    path = checkpoint()
                    raise TrainingStopped(f"stage {stage.name!r} stopped by SIGTERM after step {loop.step} of {steps}; "
                                          f"checkpoint {path}; run the same command again to resume", path)
                batches, samples, skipped = [], 0, 0
                for _ in range(plan.accumulation):
                    batch = next(micro_batches)
                    skipped += int(batch.pop("num_skipped"))
                    n = int(batch.pop("num_samples"))
                    samples += n
                    batches.append(batch if n else filler.get())
                counts = [model.count_targets(b) for b in batches]
                global_targets, global_samples, global_skipped = dist.all_reduce_sum([sum(counts), samples, skipped])
                scale = plan.processes / max(global_targets, 1.0)
                local_sum = 0.0
                for j, batch in enumerate(batches):
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    with strategy.sync(last=j == len(batches) - 1):
                        with autocast(train.precision):
                            out = strategy.module(**batch)
                        strategy.backward(out.loss_sum * scale)
                    local_sum += float(out.loss_sum.detach())
                (loss_sum,) = dist.all_reduce_sum([local_sum])
                loss = loss_sum / global_targets if global_targets else 0.0
                grad_norm = None
                if global_targets:
                    grad_norm = strategy.step(stage.max_grad_norm)
                else:
                    log.warning("stage %r step %d: the global batch has no targets; no update", stage.name, loop.step + 1)
                    strategy.skip_step()
                loop.step += 1
                loop.batch_in_epoch += 1
                loop.samples += int(global_samples)
                loop.skipped += int(global_skipped)
                window_samples += int(global_samples)
                steps_this_call += 1
                losses.append(loss)
                now = time.perf_counter()
                rate = window_samples / max(now - window_start, 1e-9)
                lr = strategy.last_lr()
                record = {"stage": stage.name, "step": loop.step, "epoch": loop.epoch, "loss": round(loss, 6), "lr": lr,
                          "samples_per_s": round(rate, 2), "samples": loop.samples, "skipped": loop.skipped,
                          "tokens": int(global_targets)}
                if grad_norm is not None:
                    record["grad_norm"] = round(grad_norm, 4)
                if dist.is_main():
                    metrics.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
                if loop.step % train.log_every == 0 or loop.step == steps:
                    log.debug("stage %s step %d/%d loss %.4f lr %.2e %.0f samples/s", stage.name, loop.step, steps, loss, lr, rate)
                    window_start, window_samples = now, 0
                if train.save_every and loop.step % train.save_every == 0 and loop.step < steps:
                    checkpoint()
                if stop_after is not None and steps_this_call >= stop_after:
                    bar.close()
                    raise TrainingInterrupted(f"stopped after {steps_this_call} step(s) at step {loop.step}")
            if loop.batch_in_epoch >= sampler.steps_per_epoch():
                loop.epoch += 1
                loop.batch_in_epoch = 0

    bar.close()
    checkpoint()
    if dist.is_main():
        plot_loss(metrics.records(), folder / "loss.png", f"{stage.name}: training loss")
    if loop.skipped:
        log.warning("stage %r: skipped %d bad sample(s) (data.skip_bad_rows)", stage.name, loop.skipped)
    trained = strategy.unwrap()
    trained.eval()
    return StageResult(loop.step, losses[-1] if losses else float("nan"), time.perf_counter() - started, loop.samples,
                       loop.skipped, losses, trained)

