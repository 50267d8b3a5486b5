"""One training loop for every stage, built on accelerate.

AdamW (no decay on biases and norms), linear warmup + cosine decay, gradient accumulation,
fp32/bf16 autocast, optional gradient checkpointing, gradient clipping, a progress bar with
loss / lr / samples per second, one JSONL record per optimizer step, periodic resumable
checkpoints and a loss-curve PNG. Runs under ``accelerate launch`` / ``torchrun`` unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from vlmkit.config import StageConfig, TrainConfig
from vlmkit.data.dataset import Collator, ConversationDataset, ResumableBatchSampler
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.training.checkpoint import LoopState, list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from vlmkit.training.metrics import MetricsLog, plot_loss
from vlmkit.training.policy import apply_policy, format_policy, set_train_modes

log = logging.getLogger("vlmkit")


class TrainingInterrupted(RuntimeError):
    """Raised by ``stop_after``: the loop stopped early on purpose (tests simulate a crash with it)."""


@dataclass
class StageResult:
    """What a finished stage reports."""

    steps: int
    final_loss: float
    seconds: float
    samples: int
    skipped: int
    losses: list[float] = field(default_factory=list)


def _param_groups(params: list[tuple[str, torch.nn.Parameter]], stage: StageConfig) -> list[dict[str, Any]]:
    """AdamW groups: per part (its lr scale) x decay / no decay (biases and norms are not decayed)."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in params:
        part = name.split(".", 1)[0]
        decays = p.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((part, decays), []).append(p)
    return [
        {"params": ps, "weight_decay": stage.weight_decay if decays else 0.0, "lr": stage.lr * stage.lr_scale.get(part, 1.0)}
        for (part, decays), ps in groups.items()
    ]


def total_steps(stage: StageConfig, dataset_size: int, num_processes: int = 1) -> int:
    """Optimizer steps the stage runs: ``max_steps`` or ``epochs`` over the data."""
    if stage.max_steps:
        return stage.max_steps
    micro = math.ceil(dataset_size / (stage.batch_size * num_processes))
    return max(1, math.ceil(stage.epochs * micro / stage.grad_accum))


def enable_gradient_checkpointing(model: VisionLanguageModel) -> None:
    """Turn on activation recomputation in every part that supports it."""
    for hf in (model.vision.tower, model.language.hf_model):
        if getattr(hf, "supports_gradient_checkpointing", False):
            enable = getattr(hf, "activation_checkpointing_enable", None)  # transformers' name since late 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.language.hf_model.config.use_cache = False


def make_accelerator(precision: str) -> Accelerator:
    """An :class:`Accelerator` for ``precision`` (``fp32`` or ``bf16``).

    accelerate keeps one process-wide state; a second run in the same process (a notebook, a test
    session) with another precision would be refused, so a state with a different mixed precision is
    reset first. Distributed set-up (``accelerate launch``/torchrun) is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    wanted = "bf16" if precision == "bf16" else "no"
    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != wanted:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    return Accelerator(mixed_precision=wanted)


def train_stage(
    model: VisionLanguageModel,
    dataset: ConversationDataset,
    stage: StageConfig,
    train: TrainConfig,
    folder: str | Path,
    accelerator: Accelerator,
    stop_after: int | None = None,
    num_workers: int = 0,
) -> StageResult:
    """Train ``model`` on ``dataset`` as ``stage`` declares; resume from ``folder/checkpoints`` if present.

    Args:
        folder: the stage folder (metrics.jsonl, checkpoints/, loss.png, policy.txt).
        stop_after: stop with :class:`TrainingInterrupted` after this many optimizer steps in this call.
        num_workers: DataLoader worker processes.

    Returns:
        :class:`StageResult` with per-step losses of this call.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reports = apply_policy(model, stage.policy, stage.lora)
    policy_text = format_policy(stage.name, reports)
    log.info(policy_text)
    (folder / "policy.txt").write_text(policy_text + "\n")
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(named, stage), lr=stage.lr)
    steps = total_steps(stage, len(dataset), accelerator.num_processes)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(round(stage.warmup_ratio * steps)), num_training_steps=steps,
        min_lr_rate=stage.min_lr_ratio,
    )
    prepared, optimizer = accelerator.prepare(model, optimizer)

    metrics = MetricsLog(folder / "metrics.jsonl")
    ckpt_dir = folder / "checkpoints"
    loop = LoopState()
    existing = list_checkpoints(ckpt_dir)
    if existing:
        loop = load_checkpoint(existing[-1], model, optimizer, scheduler)
        log.info("stage %r: resumed from %s (step %d of %d)", stage.name, existing[-1], loop.step, steps)
        metrics.truncate_after(loop.step)
    elif metrics.path.exists():
        metrics.path.unlink()

    collator = Collator(dataset.processor, "right")
    params = [p for _, p in named]
    bar = tqdm(total=steps, initial=loop.step, desc=stage.name, disable=not (train.progress and accelerator.is_main_process), dynamic_ncols=True)
    losses: list[float] = []
    started = time.perf_counter()
    window_start, window_samples = time.perf_counter(), 0
    steps_this_call = 0
    set_train_modes(model, stage.policy)

    while loop.step < steps:
        sampler = ResumableBatchSampler(len(dataset), stage.batch_size, train.seed, loop.epoch, loop.batch_in_epoch)
        # the loader's own generator: creating its iterator must not draw from the global RNG, whose
        # state a checkpoint restores for dropout (a resumed run creates an iterator mid-epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(sampler.draw_seed))
        loader = accelerator.prepare_data_loader(loader, device_placement=True)
        accum, accum_loss, accum_samples = 0, 0.0, 0
        for batch in loader:
            loop.batch_in_epoch += 1
            loop.skipped += int(batch.pop("num_skipped"))
            n = int(batch.pop("num_samples"))
            end_of_epoch = loop.batch_in_epoch >= sampler.batches_per_epoch()
            if n:
                with accelerator.autocast():
                    out = prepared(**batch)
                accelerator.backward(out.loss / stage.grad_accum)
                accum += 1
                accum_loss += float(out.loss.detach()) / stage.grad_accum
                accum_samples += n
            if accum == 0 or (accum < stage.grad_accum and not end_of_epoch):
                continue
            if accum < stage.grad_accum:  # a short final accumulation: rescale to a true mean
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(stage.grad_accum / accum)
                accum_loss *= stage.grad_accum / accum
            grad_norm = None
            if stage.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(params, stage.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            loop.samples += accum_samples
            window_samples += accum_samples
            steps_this_call += 1
            losses.append(accum_loss)
            now = time.perf_counter()
            rate = window_samples / max(now - window_start, 1e-9)
            lr = scheduler.get_last_lr()[0]
            record = {"stage": stage.name, "step": loop.step, "epoch": loop.epoch, "loss": round(accum_loss, 6), "lr": lr,
                      "samples_per_s": round(rate, 2), "samples": loop.samples, "skipped": loop.skipped}
            if grad_norm is not None:
                record["grad_norm"] = round(grad_norm, 4)
            if accelerator.is_main_process:
                metrics.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{accum_loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
            if loop.step % train.log_every == 0 or loop.step == steps:
                log.debug("stage %s step %d/%d loss %.4f lr %.2e %.0f samples/s", stage.name, loop.step, steps, accum_loss, lr, rate)
                window_start, window_samples = now, 0
            accum, accum_loss, accum_samples = 0, 0.0, 0
            if train.save_every and loop.step % train.save_every == 0 and loop.step < steps:
                _checkpoint(accelerator, ckpt_dir / f"step-{loop.step:07d}", model, optimizer, scheduler, loop, train.keep_checkpoints)
            if stop_after is not None and steps_this_call >= stop_after:
                bar.close()
                raise TrainingInterrupted(f"stopped after {steps_this_call} step(s) at step {loop.step}")
            if loop.step >= steps:
                break
        if loop.batch_in_epoch >= sampler.batches_per_epoch():
            loop.epoch += 1
            loop.batch_in_epoch = 0

    bar.close()
    _checkpoint(accelerator, ckpt_dir / f"step-{loop.step:07d}", model, optimizer, scheduler, loop, train.keep_checkpoints)
    if accelerator.is_main_process:
        plot_loss(metrics.records(), folder / "loss.png", f"{stage.name}: training loss")
    if loop.skipped:
        log.warning("stage %r: skipped %d bad sample(s) (data.skip_bad_rows)", stage.name, loop.skipped)
    model.eval()
    return StageResult(loop.step, losses[-1] if losses else float("nan"), time.perf_counter() - started, loop.samples, loop.skipped, losses)


def _checkpoint(accelerator: Accelerator, path: Path, model, optimizer, scheduler, loop: LoopState, keep: int) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(path, model, optimizer, scheduler, loop)
        prune_checkpoints(path.parent, keep)
