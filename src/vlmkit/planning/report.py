"""The plan as text: a header, one table per stage, flags, notes and advice."""

from __future__ import annotations

from typing import Any

#: byte units for display (decimal, as GPU memory is usually quoted)
_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


def gb(size: float) -> str:
    """``size`` bytes, readable (``14.13 GB``, ``85.4 MB``); decimal units."""
    sign, size = ("-" if size < 0 else ""), abs(size)
    for scale, unit in _UNITS:
        if size >= scale:
            value = size / scale
            return f"{sign}{value:.2f} {unit}" if value < 100 else f"{sign}{value:.1f} {unit}"
    return f"{sign}{size:.0f} B"


def count(n: int) -> str:
    """A parameter count: ``7.06B``, ``21.0M``, ``548k``."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if n < 10 * scale else f"{n / scale:.1f}{unit}"
    return str(n)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else ("es" if word.endswith("ch") else "s"))


def format_plan(plan: Any) -> str:
    """The whole plan (see :func:`vlmkit.planning.plan.plan_recipe`) as printed by ``vlmkit plan``."""
    hw, setup, recipe = plan.hardware, plan.setup, plan.recipe
    chosen = f" (recipe: {recipe.train.strategy})" if recipe.train.strategy != setup.strategy else ""
    lines = [
        f"vlmkit plan {plan.source}: {_plural(hw.gpus, 'GPU')} x {gb(hw.gpu_memory)}"
        f"{f' on {hw.nodes} nodes' if hw.nodes > 1 else ''}, strategy {setup.describe()}{chosen}, "
        f"precision {setup.precision}, weights {setup.model_dtype}",
    ]
    first = plan.stages[0]
    parts = " + ".join(f"{c.part} {count(c.total - c.lora)}" for c in first.counts if c.total - c.lora)
    lines.append(f"model: {first.stats.total - first.stats.lora:,} parameters ({parts}); {_visual(first)}")
    for stage in plan.stages:
        lines += [""] + _stage_lines(plan, stage)
    for title, items in (("flags (known-bad combinations)", plan.flags), ("notes", plan.notes)):
        if items:
            lines += ["", f"{title}:"] + [f"  - {item}" for item in items]
    lines += ["", "verdict: " + ("every stage fits" if plan.fits else
                                 "does not fit: " + ", ".join(s.stage.name for s in plan.stages if not s.memory.fits(hw)))]
    return "\n".join(lines)


def _visual(stage: Any) -> str:
    """How the images of a sample reach the language model."""
    if stage.media_tokens != stage.visual_tokens:  # cross-attention: placeholders in the text, features in the blocks
        return (f"{_plural(stage.visual_tokens, 'image placeholder')} per sample in the sequence, "
                f"{_plural(stage.media_tokens, 'visual token')} through the cross-attention blocks")
    return f"{_plural(stage.visual_tokens, 'visual token')} per sample"


def _sequence(stage: Any) -> str:
    """The micro-batch's sequence shape and targets, in the terms of the language model's kind."""
    if stage.kind == "encoder-decoder":
        return (f"{stage.seq_len} encoder tokens per sample ({stage.visual_tokens} visual) + {stage.answer_len} decoder "
                f"(answer) tokens, {stage.labelled:,} answer positions per micro-batch")
    if stage.kind == "encoder":
        return f"{stage.seq_len} tokens per sample ({stage.visual_tokens} visual), one answer class per sample"
    return (f"{stage.seq_len} tokens per sample ({stage.visual_tokens} visual), {stage.labelled:,} labelled positions "
            "per micro-batch")


def _stage_lines(plan: Any, stage: Any) -> list[str]:
    hw, st, mem, other = plan.hardware, stage.stage, stage.memory, stage.other
    policy = ", ".join(f"{c.part} {c.policy}" for c in stage.counts if c.total)
    share = 100 * stage.stats.trainable / max(stage.stats.total, 1)
    lines = [
        f"stage {st.name}: {policy}; {stage.stats.trainable:,} trainable ({share:.2f}%)",
        f"  batch: {st.batch_size} per step = {stage.micro} per GPU x {_plural(hw.gpus, 'GPU')} x {stage.accumulation} "
        f"accumulation; {_sequence(stage)}",
    ]
    on = "on (recipe)" if stage.checkpointing else "on"
    off = "off" if stage.checkpointing else "off (recipe)"
    columns = [(on if stage.checkpointing else off, mem)] + ([(off if stage.checkpointing else on, other)] if other else [])
    header = "  per GPU".ljust(40) + "".join(f"{'checkpointing ' + name:>26}" for name, _ in columns)
    lines.append(header)
    state = mem.state
    rows = [
        ("weights", state.weights - state.lora, None),
        ("LoRA adapters", state.lora, None),
        ("gradients (kept for the step)", state.gradients, None),
        ("optimizer states", state.optimizer, None),
        ("communication buffers" if plan.setup.strategy != "ddp" else "DDP gradient buckets", state.buffers, None),
        ("batch", mem.batch, None),
        ("activations kept for backward", None, "stored"),
        ("forward + backward at most", None, "forward_backward"),
        ("optimizer step (grads + temporaries)", state.gradients + state.step, None),
        ("peak estimate", None, "peak"),
    ]
    for label, value, attr in rows:
        cells = [value if attr is None else getattr(m, attr) for _, m in columns]
        if label == "communication buffers" and not any(cells):
            continue
        lines.append(f"  {label:<38}" + "".join(f"{gb(c):>26}" for c in cells))
    lines.append(f"  {'free of ' + gb(hw.gpu_memory):<38}" + "".join(
        f"{gb(m.free(hw)) + (' fits' if m.fits(hw) else ' OVER'):>26}" for _, m in columns))
    if state.gathered:
        lines.append(f"  (forward + backward includes {gb(state.gathered)} of gathered parameters and buckets)")
    if state.host:
        lines.append(f"  host memory per process (offloaded): {gb(state.host)}")
    trace = stage.trace
    per_step = stage.stage.batch_size // stage.micro
    lines.append(f"  step FLOPs: {stage.step_flops:.3e} over all GPUs = {_plural(per_step, 'micro-batch')} x (forward "
                 f"{trace.forward_flops:.3e} + backward {trace.backward_flops:.3e}"
                 f"{', with any recomputation' if stage.checkpointing else ''})")
    lines.append(f"  peak falls in the {mem.phase}; {'fits' if mem.fits(hw) else 'does NOT fit'}")
    lines += [f"  -> {a}" for a in stage.advice]
    return lines
