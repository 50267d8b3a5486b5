"""Flags for known-bad combinations, and what to change when a stage does not fit.

Both are registries of small check functions: a flag check looks at the whole plan and returns a
line or nothing; an advice rule looks at one stage that does not fit and returns a concrete change
with the peak it would give (re-composed from the same trace, so "about" where the change would
alter the trace itself).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

from vlmkit.planning.memory import HANDOVER, device_memory, scaled_trace
from vlmkit.planning.parameters import parameter_stats
from vlmkit.planning.report import gb
from vlmkit.planning.sharding import SHARDING, Setup, read_zero_config
from vlmkit.registry import Registry

FlagCheck = Callable[["Plan", "PlanOptions"], "str | None"]  # noqa: F821
AdviceRule = Callable[["Plan", "StagePlan", "PlanOptions"], "str | None"]  # noqa: F821

FLAGS: Registry[FlagCheck] = Registry("plan flag")
ADVICE: Registry[AdviceRule] = Registry("plan advice")

#: below this share of free memory a fitting plan is called tight
TIGHT = 0.05


def add_advice(plan, options) -> None:
    """Fill ``plan.flags``, ``plan.notes`` and each stage's ``advice``."""
    for name in FLAGS:
        line = FLAGS.get(name)(plan, options)
        if line:
            plan.flags.append(line)
    for stage in plan.stages:
        free = stage.memory.free(plan.hardware)
        if free < 0:
            stage.advice = [line for name in ADVICE if (line := ADVICE.get(name)(plan, stage, options))]
        elif free < TIGHT * plan.hardware.gpu_memory:
            stage.advice = [f"tight: {gb(free)} left of {gb(plan.hardware.gpu_memory)}; CUDA's context (~0.5-1 GB) and "
                            "allocator fragmentation are not in the estimate"]
    half = any(s.stats.trainable_bytes < 4 * s.stats.trainable for s in plan.stages)  # trainable bf16/fp16 tensors
    if half and plan.setup.strategy != "deepspeed":
        plan.notes.append(f"trainable weights, their gradients and AdamW states are {plan.recipe.model.dtype} (model.dtype): "
                          "an update smaller than ~1/256 of a weight rounds away; float32 weights with train.precision=bf16 "
                          "keep full-precision states (more memory), DeepSpeed keeps fp32 masters")
    host = max((s.memory.state.host for s in plan.stages), default=0.0) * plan.hardware.gpus_per_node
    if host and plan.hardware.cpu_memory is None:
        plan.notes.append(f"offloading needs about {gb(host)} of host memory per node ({plan.hardware.gpus_per_node} "
                          "processes); pass --cpu-memory to check it")


# ---------------------------------------------------------------------------------------------
# flags: known-bad combinations


@FLAGS.register("strategy-none-on-several")
def _none_on_several(plan, options):
    if plan.setup.strategy == "none" and plan.hardware.gpus > 1:
        return (f"train.strategy=none runs one process, but {plan.hardware.gpus} GPUs are planned: the trainer refuses "
                "this launch; use ddp, fsdp or deepspeed (or auto)")


@FLAGS.register("hybrid-on-one-node")
def _hybrid_one_node(plan, options):
    if plan.setup.strategy == "fsdp" and plan.setup.fsdp_sharding == "hybrid" and plan.hardware.nodes == 1:
        return ("train.fsdp.sharding=hybrid on one node: hybrid shards within a node and replicates across nodes, so on "
                "one node it is full sharding with an extra mesh dimension; use train.fsdp.sharding=full")


@FLAGS.register("float16-weights")
def _float16(plan, options):
    recipe = plan.recipe
    if recipe.model.dtype != "float16":
        return None
    mixed = " under bf16 autocast (matmuls in bf16, the weights float16)" if recipe.train.precision == "bf16" else ""
    return (f"model.dtype=float16{mixed}: weights, gradients and AdamW states in float16 without loss scaling let small "
            "gradients underflow and large activations overflow; use model.dtype=bfloat16 (or float32 with train.precision=bf16)")


@FLAGS.register("ddp-full-copy")
def _ddp_full_copy(plan, options):
    if plan.setup.strategy != "ddp":
        return None
    worst = max(plan.stages, key=lambda s: s.memory.state.weights + s.memory.state.gradients + s.memory.state.optimizer
                + s.memory.state.buffers)
    state = worst.memory.state
    static = state.weights + state.gradients + state.optimizer + state.buffers
    if static > plan.hardware.gpu_memory:
        return (f"ddp keeps a full copy per GPU: stage {worst.stage.name!r} needs {gb(static)} for weights, gradients, "
                f"buckets and AdamW states before any activation, over {gb(plan.hardware.gpu_memory)}; use "
                "train.strategy=fsdp or deepspeed with zero3")


@FLAGS.register("checkpointing-without-effect")
def _checkpointing_without_effect(plan, options):
    lines = []
    for s in plan.stages:
        if not s.checkpointing or s.other is None or s.memory.stored < 0.8 * s.other.stored:
            continue
        lines.append(f"stage {s.stage.name!r}: activation checkpointing is on but keeps {gb(s.memory.stored)} of "
                     f"{gb(s.other.stored)} (what is kept lies outside the checkpointed layers); a smaller micro-batch "
                     "is what helps here")
    return "; ".join(lines) or None


@FLAGS.register("host-memory")
def _host_memory(plan, options):
    cpu = plan.hardware.cpu_memory
    host = max((s.memory.state.host for s in plan.stages), default=0.0) * plan.hardware.gpus_per_node
    if cpu is not None and host > cpu:
        return (f"offloading needs about {gb(host)} of host memory per node ({plan.hardware.gpus_per_node} processes), "
                f"more than --cpu-memory={gb(cpu)}; use more nodes, offload less (zero3 without offload) or LoRA")


@FLAGS.register("positions")
def _positions(plan, options):
    longest, limit = max(s.seq_len for s in plan.stages), plan.max_positions
    if limit is not None and longest > limit:
        return (f"sequences of {longest} tokens exceed the language model's max_position_embeddings={limit}: positions "
                "beyond it were never trained; lower model.max_length (or --seq-len)")


@FLAGS.register("visual-share")
def _visual_share(plan, options):
    for s in plan.stages:
        if s.visual_tokens > 0.9 * s.seq_len:
            return (f"stage {s.stage.name!r}: {s.visual_tokens} visual tokens leave {s.seq_len - s.visual_tokens} of "
                    f"{s.seq_len} positions for text; samples with longer text will be refused at encoding")


# ---------------------------------------------------------------------------------------------
# advice for a stage that does not fit


def _estimate(plan, stage, *, setup: Setup | None = None, trace=None, stats=None, gpus: int | None = None,
              accumulation: int | None = None):
    hw = plan.hardware if gpus is None else dataclasses.replace(plan.hardware, gpus=gpus, nodes=max(1, gpus // plan.hardware.gpus_per_node))
    return device_memory(stats or stage.stats, setup or plan.setup, hw, trace or stage.trace,
                         accumulation or stage.accumulation, stage.memory.batch)


def _fits(plan, memory) -> bool:
    return memory.peak <= plan.hardware.gpu_memory


@ADVICE.register("handover")
def _handover(plan, stage, options):
    if stage.memory.phase != HANDOVER:
        return None
    if plan.setup.strategy == "fsdp":
        return (f"the peak is the whole model ({gb(stage.memory.peak)}) on every GPU before FSDP shards it, whatever the "
                "batch: a smaller model.dtype (bfloat16 weights), or GPUs with more memory")
    return (f"the peak ({gb(stage.memory.peak)}) is DeepSpeed's copy of the whole model out of its engine at the end of the "
            "stage: train.strategy=fsdp, or GPUs with more memory")


@ADVICE.register("checkpointing")
def _checkpointing(plan, stage, options):
    if stage.checkpointing or stage.other is None:
        return None
    verdict = "fits" if _fits(plan, stage.other) else "still over"
    return f"turn on activation checkpointing (train.gradient_checkpointing=true): peak {gb(stage.other.peak)}, {verdict}"


@ADVICE.register("micro-batch")
def _micro_batch(plan, stage, options):
    share = stage.stage.batch_size // plan.hardware.gpus  # samples per device per step
    for micro in sorted((m for m in range(1, stage.micro) if share % m == 0), reverse=True):
        memory = _estimate(plan, stage, trace=scaled_trace(stage.trace, micro / stage.micro), accumulation=share // micro)
        memory = dataclasses.replace(memory, peak=memory.peak - stage.memory.batch * (1 - micro / stage.micro))
        if _fits(plan, memory):
            return (f"stages.{stage.stage.name}.micro_batch_size={micro} (accumulation {share // micro}): peak about "
                    f"{gb(memory.peak)}")
    if stage.micro > 1:
        return f"even stages.{stage.stage.name}.micro_batch_size=1 does not fit with this strategy"


@ADVICE.register("sharding")
def _sharding(plan, stage, options):
    if plan.hardware.gpus == 1:  # nothing to shard over
        return None
    current = plan.setup
    candidates: list[tuple[str, Setup]] = []
    if current.strategy in ("none", "ddp"):
        candidates.append(("train.strategy=fsdp", dataclasses.replace(current, strategy="fsdp", fsdp_sharding="full")))
    if current.strategy != "deepspeed" or current.zero_stage < 3:
        candidates.append(("train.strategy=deepspeed train.deepspeed=zero3",
                           dataclasses.replace(current, strategy="deepspeed", deepspeed="zero3", zero=read_zero_config("zero3"))))
    if current.strategy == "fsdp" and not current.fsdp_cpu_offload:
        candidates.append(("train.fsdp.cpu_offload=true", dataclasses.replace(current, fsdp_cpu_offload=True)))
    if current.strategy == "deepspeed" and current.zero_stage == 3 and current.deepspeed != "zero3-offload":
        candidates.append(("train.deepspeed=zero3-offload",
                           dataclasses.replace(current, deepspeed="zero3-offload", zero=read_zero_config("zero3-offload"))))
    lines = []
    for change, setup in candidates:
        memory = _estimate(plan, stage, setup=setup)
        approx = "about " if SHARDING.get(setup.strategy).cast_to(setup) != SHARDING.get(current.strategy).cast_to(current) else ""
        lines.append(f"{change}: peak {approx}{gb(memory.peak)}{'' if _fits(plan, memory) else ' (still over)'}")
    return "; ".join(lines) or None


@ADVICE.register("more-gpus")
def _more_gpus(plan, stage, options):
    if plan.setup.strategy not in ("fsdp", "deepspeed"):
        return None
    per_node = plan.hardware.gpus_per_node
    for gpus in (plan.hardware.gpus * k for k in (2, 4, 8, 16, 32)):
        if stage.stage.batch_size % gpus:
            break
        micro = stage.micro if stage.stage.micro_batch_size else stage.stage.batch_size // gpus
        trace = scaled_trace(stage.trace, micro / stage.micro)
        memory = _estimate(plan, stage, trace=trace, gpus=gpus, accumulation=max(1, stage.stage.batch_size // (micro * gpus)))
        if _fits(plan, memory):
            return f"--gpus {gpus} ({gpus // per_node} nodes of {per_node}): peak about {gb(memory.peak)}"
    return None


@ADVICE.register("lora")
def _lora(plan, stage, options):
    policy = stage.stage.policy
    if policy.get("language") != "full":
        return None
    from vlmkit.planning.skeleton import stage_skeleton

    lora_stage = dataclasses.replace(copy.deepcopy(stage.stage), policy={**policy, "language": "lora"})
    skeleton = stage_skeleton(plan.base_model, lora_stage, plan.recipe.model.dtype)
    stats = parameter_stats(skeleton, plan.recipe.train.fsdp.wrap)
    memory = _estimate(plan, stage, stats=stats)
    return (f"stages.{stage.stage.name}.policy.language=lora (r={lora_stage.lora.r}: {skeleton.trainable / 1e6:,.1f}M "
            f"trainable instead of {stage.stats.trainable / 1e6:,.1f}M): peak about {gb(memory.peak)}"
            f"{'' if _fits(plan, memory) else ' (still over)'}")
