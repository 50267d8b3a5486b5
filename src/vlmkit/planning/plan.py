"""Plan a recipe: per stage, per-device memory under the chosen strategy, step FLOPs, fit and advice.

``plan_recipe(recipe, overrides, PlanOptions(...))`` loads the recipe, builds its model on the meta
device (:mod:`.skeleton`), and for each stage traces one micro-batch on fake tensors (:mod:`.trace`)
with and without activation checkpointing, then places weights, gradients and optimizer states by
strategy (:mod:`.sharding`) and composes the peak (:mod:`.memory`). Nothing is downloaded or allocated.

The micro-batch follows the language model's kind (:mod:`.losses`): decoder-only rows of ``seq_len``
tokens with aligned labels; encoder-decoder rows of ``seq_len`` encoder tokens and ``answer_len``
decoder tokens; encoder-only rows of ``seq_len`` tokens with one answer index each. With
cross-attention fusion an image takes one placeholder in the sequence and its visual tokens enter
through the fusion blocks.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.config import STRATEGIES, ConfigError, RecipeConfig, StageConfig, load_recipe
from vlmkit.planning.architectures import saved_model_config
from vlmkit.planning.losses import KIND_LOSSES
from vlmkit.planning.memory import DeviceMemory, batch_bytes, device_memory
from vlmkit.planning.parameters import ParameterStats, parameter_stats
from vlmkit.planning.sharding import SHARDING, Hardware, Setup, read_zero_config
from vlmkit.planning.skeleton import DEFAULT_ANSWERS, PartCount, build_meta_model, stage_skeleton
from vlmkit.planning.trace import MicroBatch, MicroBatchTrace, trace_micro_batch


@dataclass(frozen=True)
class PlanOptions:
    """What to plan for; ``None`` fields keep the recipe's value.

    Attributes:
        gpus: devices over all nodes (one process each).
        gpu_memory: bytes per device.
        nodes: machines the devices are spread over evenly.
        cpu_memory: bytes of host memory per node (checked for offloading; unknown when None).
        strategy: ``train.strategy`` (auto, none, ddp, fsdp, deepspeed).
        deepspeed: ``train.deepspeed`` (zero2, zero3, zero3-offload or a JSON file); implies the
            deepspeed strategy when ``strategy`` is not given.
        micro_batch: every stage's ``micro_batch_size``.
        seq_len: tokens per sample, visual tokens included (default ``model.max_length``; the trainer
            pads each micro-batch to its longest sample, so this is the worst case).
        label_fraction: share of the text positions that carry a label (the LM head and the loss run
            on those only); 1.0, every text position, is the upper bound.
        images_per_sample: images in each sample.
        answer_len: decoder tokens per sample of an encoder-decoder language model (the answer; the
            processor does not cap it, so this is an assumption to set from the data).
        answers: answer vocabulary size of an encoder-only model whose recipe has no ``model.answers``
            yet (`vlmkit train` builds them from the data).
        stages: plan only these stages (names); all when None.
        compare_checkpointing: also trace the other activation-checkpointing setting, for the
            comparison column (one more trace per stage).
        foreach_adamw: AdamW's foreach implementation (PyTorch's default on CUDA); False models the
            per-tensor one the CPU runs.
    """

    gpus: int = 1
    gpu_memory: int = 80 * 10**9
    nodes: int = 1
    cpu_memory: int | None = None
    strategy: str | None = None
    deepspeed: str | None = None
    micro_batch: int | None = None
    seq_len: int | None = None
    label_fraction: float = 1.0
    images_per_sample: int = 1
    answer_len: int = 128
    answers: int = DEFAULT_ANSWERS
    stages: list[str] | None = None
    compare_checkpointing: bool = True
    foreach_adamw: bool = True

    def __post_init__(self) -> None:
        for name in ("gpus", "nodes", "gpu_memory"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        if self.gpus % self.nodes:
            raise ConfigError(f"--gpus={self.gpus} does not spread evenly over --nodes={self.nodes}; use a multiple of {self.nodes}")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy={self.strategy!r} is not valid; choose one of {', '.join(STRATEGIES)}")
        for name in ("answer_len", "answers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        for name in ("micro_batch", "seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value} must be at least 1")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"--label-fraction={self.label_fraction} must be in (0, 1]")
        if self.images_per_sample < 0:
            raise ConfigError(f"--images-per-sample={self.images_per_sample} must be >= 0")


@dataclass
class StagePlan:
    """One stage's plan on one device.

    Attributes:
        visual_tokens: image placeholders per sample in the language sequence.
        media_tokens: visual tokens per sample the connector emits (= ``visual_tokens`` for prefix
            fusion; with cross-attention they reach the language model through the fusion blocks).
        answer_len: decoder tokens per sample (encoder-decoder), else 0.
        kind: the language model's kind (decoder, encoder-decoder, encoder).
        labelled: targets per micro-batch (label positions; answer tokens; rows for encoder-only).
        memory: the estimate under the recipe's activation checkpointing setting.
        other: the estimate with the other setting (None when not compared).
        trace: the traced micro-batch behind ``memory``.
        step_flops: FLOPs of one optimizer step over all devices (forward + backward, recomputation included).
    """

    stage: StageConfig
    counts: list[PartCount]
    stats: ParameterStats
    micro: int
    accumulation: int
    seq_len: int
    visual_tokens: int
    labelled: int
    checkpointing: bool
    memory: DeviceMemory
    other: DeviceMemory | None
    trace: MicroBatchTrace
    step_flops: int
    media_tokens: int = 0
    answer_len: int = 0
    kind: str = "decoder"
    advice: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """A recipe's plan: the hardware, the strategy, one :class:`StagePlan` per stage, and flags
    (known-bad combinations) that hold for the whole run. ``base_model``: the recipe's model on the
    meta device, before any stage's policy."""

    recipe: RecipeConfig
    source: str
    hardware: Hardware
    setup: Setup
    stages: list[StagePlan]
    base_model: Any = field(default=None, repr=False)
    max_positions: int | None = None
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(s.memory.fits(self.hardware) for s in self.stages)


def resolve_setup(recipe: RecipeConfig, options: PlanOptions) -> Setup:
    """The strategy the run would use on ``options.gpus`` devices (``auto``: ddp on several, else none).

    Raises:
        ConfigError: ``--deepspeed`` with another ``--strategy``, or a DeepSpeed config that cannot be read.
    """
    train = recipe.train
    strategy = options.strategy
    if options.deepspeed is not None:
        if strategy not in (None, "deepspeed"):
            raise ConfigError(f"--deepspeed={options.deepspeed} configures the deepspeed strategy, not --strategy={strategy}; "
                              "drop one of them")
        strategy = "deepspeed"
    strategy = strategy or train.strategy
    if strategy == "auto":
        strategy = "ddp" if options.gpus > 1 else "none"
    deepspeed = options.deepspeed or train.deepspeed
    zero = read_zero_config(deepspeed) if strategy == "deepspeed" else {}
    return Setup(strategy=strategy, precision=train.precision, model_dtype=recipe.model.dtype,
                 fsdp_sharding=train.fsdp.sharding, fsdp_cpu_offload=train.fsdp.cpu_offload,
                 fsdp_reshard=train.fsdp.reshard_after_forward, deepspeed=deepspeed if strategy == "deepspeed" else None,
                 zero=zero, foreach_adamw=options.foreach_adamw)


def plan_recipe(recipe: str | Path, overrides: list[str] | None = None, options: PlanOptions | None = None) -> Plan:
    """Plan ``recipe`` (a shipped name or YAML file, with dotted overrides) on ``options``' hardware.

    Raises:
        ConfigError: a bad recipe, override or option; a global batch that does not split over the
            devices; a pretrained source that cannot be sized offline (a whole saved model is sized from
            a vlmkit model folder's description).
        ValueError: a model the builder refuses, or a sequence too short for the visual tokens.
    """
    options = options or PlanOptions()
    config = load_recipe(recipe, overrides or [])
    saved = config.model.pretrained
    if saved:  # training starts from the folder's own description (its dtype and max_length included)
        config.model = saved_model_config(config.model)
    stages = config.stages
    if options.stages:
        unknown = [s for s in options.stages if s not in {st.name for st in stages}]
        if unknown:
            raise ConfigError(f"--stage {', '.join(unknown)}: no such stage; stages: {', '.join(s.name for s in stages)}")
        stages = [s for s in stages if s.name in options.stages]
    if not stages:
        raise ConfigError(f"recipe {config.name!r} has no stages to plan")
    setup = resolve_setup(config, options)
    hw = Hardware(options.gpus, options.nodes, options.gpu_memory, options.cpu_memory)
    for stage in stages:  # a batch that does not split fails before the model is built
        _with_micro(stage, options).micro_and_accumulation(hw.gpus)
    base, _ = build_meta_model(config.model, options.answers)
    plans = [_plan_stage(config, stage, base, setup, hw, options) for stage in stages]
    positions = getattr(base.language.config, "max_position_embeddings", None)
    plan = Plan(recipe=config, source=str(recipe), hardware=hw, setup=setup, stages=plans, base_model=base,
                max_positions=positions if isinstance(positions, int) else None)
    if saved:
        plan.notes.append(f"model.pretrained: the model is the one described in {saved} (vlmkit_config.json), its "
                          f"max_length {config.model.max_length} and dtype {config.model.dtype} included")
    note = KIND_LOSSES.get(base.language.spec.kind).note
    if note:
        plan.notes.append(note.format(answer_len=options.answer_len))
    if base.language.spec.kind == "encoder" and not config.model.answers:
        plan.notes.append(f"model.answers is empty (vlmkit train builds it from the data): the answer classifier is "
                          f"sized for {options.answers:,} answers (--answers)")
    from vlmkit.planning.advice import add_advice

    add_advice(plan, options)
    return plan


def _with_micro(stage: StageConfig, options: PlanOptions) -> StageConfig:
    """``stage`` with ``--micro-batch`` applied (validated like the recipe's own value)."""
    if options.micro_batch is None:
        return stage
    return dataclasses.replace(copy.deepcopy(stage), micro_batch_size=options.micro_batch)


def _plan_stage(config: RecipeConfig, stage: StageConfig, base, setup: Setup, hw: Hardware, options: PlanOptions) -> StagePlan:
    stage = _with_micro(stage, options)
    micro, accumulation = stage.micro_and_accumulation(hw.gpus)
    skeleton = stage_skeleton(base, stage, config.model.dtype)
    stats = parameter_stats(skeleton, config.train.fsdp.wrap)
    seq_len = options.seq_len or config.model.max_length
    visual = options.images_per_sample * skeleton.num_image_tokens
    if visual >= seq_len:
        raise ValueError(f"stage {stage.name!r}: {options.images_per_sample} image(s) x {skeleton.num_image_tokens} visual tokens "
                         f"fill the whole {seq_len}-token sequence; raise model.max_length or --seq-len")
    kind = KIND_LOSSES.get(skeleton.kind)
    answer_len = options.answer_len if skeleton.kind == "encoder-decoder" else 0
    labelled = kind.labelled(micro, seq_len - visual, answer_len, options.label_fraction)
    cast_to = SHARDING.get(setup.strategy).cast_to(setup)
    checkpointing = config.train.gradient_checkpointing
    batch = batch_bytes(micro, seq_len, micro * options.images_per_sample, skeleton.image_size,
                        kind.target_elements(micro, seq_len, answer_len))

    def estimate(with_checkpointing: bool) -> tuple[MicroBatchTrace, DeviceMemory]:
        shape = MicroBatch(micro, seq_len, options.images_per_sample, labelled, cast_to, setup.precision == "bf16",
                           with_checkpointing, answer_len)
        trace = trace_micro_batch(skeleton.model, shape)
        return trace, device_memory(stats, setup, hw, trace, accumulation, batch)

    trace, memory = estimate(checkpointing)
    other = estimate(not checkpointing)[1] if options.compare_checkpointing else None
    micro_batches = stage.batch_size // micro  # over all devices
    return StagePlan(stage=stage, counts=skeleton.counts, stats=stats, micro=micro, accumulation=accumulation,
                     seq_len=seq_len, visual_tokens=visual, labelled=labelled, checkpointing=checkpointing, memory=memory,
                     other=other, trace=trace, step_flops=(trace.forward_flops + trace.backward_flops) * micro_batches,
                     media_tokens=options.images_per_sample * skeleton.media_tokens, answer_len=answer_len,
                     kind=skeleton.kind)
