"""Typed configuration: dataclasses, YAML recipes, dotted command-line overrides.

Each field is documented where it is declared and validated in ``__post_init__``. Only builder
functions read these objects; model classes take flat arguments.

A recipe is YAML with the shape of :class:`RecipeConfig`. Unknown keys raise
:class:`ConfigError` naming the dotted key and listing the valid ones. Overrides use dotted paths:
``train.seed=3``, ``stages.instruct.lr=2e-4`` (a stage by name or index), ``model.vision.config.hidden_size=64``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

PARTS = ("vision", "connector", "fusion", "language")
POLICIES = ("frozen", "full", "lora")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and what would be valid."""


def _check_choice(where: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{where}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _check_positive(where: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class VisionConfig:
    encoder: str = "clip"
    """Vision tower family id (``vlmkit list encoders``): clip, siglip, vit, resnet, convnext, bit, or
    ``automodel`` (any other Hugging Face vision tower); ``auto`` picks it from the checkpoint's model_type."""
    pretrained: str | None = None
    """Hub id or local folder of pretrained weights; ``None`` builds a random tower from ``config``."""
    config: dict[str, Any] = field(default_factory=dict)
    """Hugging Face config fields: the whole config when building from scratch, overrides otherwise."""
    feature_layer: int = -2
    """Hidden state used as features: -1 is the last layer, -2 the penultimate (LLaVA)."""
    drop_cls: bool = True
    """Drop the CLS token of transformer towers (LLaVA's ``patch`` selection); no effect on conv towers."""
    image_size: int | None = None
    """Input resolution; defaults to the tower config's ``image_size`` (224 when it has none)."""
    image_mean: list[float] | None = None
    """Per-channel mean for normalisation; defaults to the tower's preprocessor config or family default."""
    image_std: list[float] | None = None
    """Per-channel std for normalisation; defaults like ``image_mean``."""
    image_aspect: str = "crop"
    """``crop``: resize shortest side then center-crop (CLIP); ``pad``: pad to square with the mean colour, then
    resize (LLaVA-1.5); ``resize``: stretch to the square without keeping the aspect ratio (BLIP-2)."""

    def __post_init__(self) -> None:
        _check_choice("model.vision.image_aspect", self.image_aspect, ("crop", "pad", "resize"))
        _check_positive("model.vision.image_size", self.image_size)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ConfigError(f"model.vision.{name} must have 3 values (R, G, B), got {value!r}")


@dataclass
class ConnectorConfig:
    type: str = "mlp2x_gelu"
    """Connector id (``vlmkit list connectors``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the connector (e.g. ``merge: 2`` to fuse 2x2 neighbouring tokens)."""
    pretrained: str | None = None
    """A ``connector.safetensors`` (e.g. a stage-1 projector) to initialise from."""


@dataclass
class TokenizerConfig:
    path: str | None = None
    """Tokenizer folder or hub id; ``None`` uses ``language.pretrained``."""
    train_vocab_size: int | None = None
    """Train a byte-level BPE tokenizer of this size on the recipe's training text (models from scratch)."""

    def __post_init__(self) -> None:
        if self.train_vocab_size is not None and self.train_vocab_size < 300:
            raise ConfigError(
                f"model.language.tokenizer.train_vocab_size={self.train_vocab_size} is too small; "
                "a byte-level BPE needs at least 300 (256 bytes + special tokens + merges)"
            )


@dataclass
class LanguageConfig:
    backbone: str = "llama"
    """Language backbone family id (``vlmkit list backbones``), ``causal_lm`` for any other
    AutoModelForCausalLM, or ``auto``: the family of the checkpoint's (or ``config``'s) model_type."""
    pretrained: str | None = None
    """Hub id or local folder of pretrained weights; ``None`` builds a random model from ``config``."""
    config: dict[str, Any] = field(default_factory=dict)
    """Hugging Face config fields: the whole config when building from scratch, overrides otherwise."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Where the tokenizer comes from."""
    preset: str | None = None
    """A named architecture of the family to build from scratch (e.g. ``chinchilla-44m``); ``config`` overrides it."""


@dataclass
class FusionConfig:
    type: str = "prefix"
    """How visual tokens reach the language model: ``prefix`` (LLaVA: in the sequence) or
    ``cross_attention`` (Flamingo: gated cross-attention blocks; decoder-only language models)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the fusion (cross_attention: ``every``, ``heads``, ``ff_mult``)."""
    pretrained: str | None = None
    """A ``fusion.safetensors`` to initialise the fusion blocks from."""


@dataclass
class ModelConfig:
    pretrained: str | None = None
    """A complete vision-language model folder to start from, in any format vlmkit reads (vlmkit,
    hf-llava, hf-blip2, llava-original; detected from its files). Its description replaces the
    ``vision``, ``connector``, ``language`` and ``fusion`` sections and the template settings."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    answers: list[str] = field(default_factory=list)
    """Answer vocabulary of encoder-only (classification) backbones; `vlmkit train` builds it from the
    training data when empty."""
    template: str = "auto"
    """Chat template (``vlmkit list templates``); ``auto`` is the tokenizer's own, else the backbone default."""
    system_prompt: str | None = None
    """System message; ``None`` keeps the template's default."""
    max_length: int = 2048
    """Longest training sample in tokens (visual tokens included)."""
    dtype: str = "float32"
    """Dtype weights are loaded in: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow Hugging Face repositories to run their own code. Off unless you trust the source."""
    allow_pickle: bool = False
    """Read pickled weights (original LLaVA ``.bin`` checkpoints, ``mm_projector.bin``) with
    ``torch.load(weights_only=True)``. Off: only safetensors are read."""

    def __post_init__(self) -> None:
        _check_positive("model.max_length", self.max_length)
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class LoraSettings:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch."""
    target_modules: list[str] | None = None
    """Module names to adapt; ``None`` uses the family default (or every linear layer)."""

    def __post_init__(self) -> None:
        _check_positive("lora.r", self.r)


@dataclass
class DataConfig:
    source: str = "llava_json"
    """Data source id: ``llava_json`` (LLaVA conversation JSON) or ``easyvqa``."""
    path: str | None = None
    """The JSON file (``llava_json``)."""
    image_folder: str | None = None
    """Folder that ``image`` paths are relative to (``llava_json``); defaults to the JSON's folder."""
    split: str = "train"
    """Split of built-in data sets (easyvqa: train or test)."""
    template: str | None = None
    """Chat template for this data (e.g. ``plain`` for stage-1 captions); ``None`` uses ``model.template``."""
    kind: str = "qa"
    """easyvqa: ``captions`` (stage-1 captions derived from shape and colour) or ``qa``."""
    turns_per_conversation: int = 1
    """easyvqa qa: questions about one image grouped into multi-turn conversations of up to this many."""
    caption_order: str = "color-shape"
    """easyvqa captions: " blue circle" (``color-shape``), " circle blue" (``shape-color``), or ``both``
    (two captions per image): the first word is predicted at the visual token itself."""
    skip_bad_rows: bool = False
    """Skip (and count in the log) rows with a bad image, bad structure or too many tokens instead of failing."""
    cache_images: bool = False
    """Keep transformed images in memory (small data sets)."""
    augment: list[str] = field(default_factory=list)
    """Label-preserving image augmentations drawn anew for every sample: hflip, vflip, rot90 (in order)."""
    limit: int | None = None
    """Use only the first N rows."""
    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        _check_choice("data.kind", self.kind, ("captions", "qa"))
        _check_choice("data.caption_order", self.caption_order, ("color-shape", "shape-color", "both"))
        _check_positive("data.turns_per_conversation", self.turns_per_conversation)
        _check_positive("data.limit", self.limit)
        _check_positive("data.num_workers", self.num_workers, allow_zero=True)
        from vlmkit.processing.augment import AUGMENTATIONS

        for name in self.augment:
            if name not in AUGMENTATIONS:
                raise ConfigError(f"data.augment: {name!r} is not an augmentation; valid: {', '.join(AUGMENTATIONS.names())}")


def complete_policy(policy: dict[str, str]) -> dict[str, str]:
    """``policy`` with every part: missing parts are frozen, except ``fusion`` (the cross-attention
    blocks), which bridges like the connector and follows its policy unless given."""
    out = {"fusion": policy.get("fusion", policy.get("connector", "frozen"))}
    out.update({part: policy.get(part, "frozen") for part in PARTS if part != "fusion"})
    return {part: out[part] for part in PARTS} | {k: v for k, v in policy.items() if k not in PARTS}


@dataclass
class StageConfig:
    name: str = "stage"
    """Stage name; names the stage's folder in the run."""
    policy: dict[str, str] = field(default_factory=lambda: {"vision": "frozen", "connector": "full", "language": "frozen"})
    """Trainability per part (vision, connector, fusion, language): frozen, full or lora. ``fusion`` (the
    cross-attention blocks; prefix fusion has no weights) follows ``connector`` unless given."""
    data: DataConfig = field(default_factory=DataConfig)
    epochs: float = 1.0
    """Passes over the data (fractions allowed); ignored when ``max_steps`` is set."""
    max_steps: int | None = None
    """Optimizer steps in this stage; overrides ``epochs``."""
    batch_size: int = 8
    """The global batch: samples per optimizer step, over all processes and accumulated micro-batches.
    The same recipe takes the same steps on 1 or 64 devices."""
    micro_batch_size: int | None = None
    """Samples per forward pass on one device; ``None``: ``batch_size`` / processes (no accumulation).
    Accumulation = ``batch_size`` / (``micro_batch_size`` x processes), which must be a whole number."""
    lr: float = 1e-3
    """Peak learning rate."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Per-part multipliers of ``lr`` (e.g. ``{vision: 3}``; LLaVA's separate projector lr is ``{connector: ...}``)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2) (BLIP-2: 0.9, 0.98)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of steps of linear warmup before the cosine decay."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of ``lr``."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; ``None`` disables clipping."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings for parts whose policy is ``lora``."""

    #: keys of earlier versions, with what replaced them
    removed_keys: typing.ClassVar[dict[str, str]] = {
        "grad_accum": "accumulation is derived now: batch_size is the global batch per optimizer step and "
                      "micro_batch_size the per-device forward; accumulation = batch_size / (micro_batch_size x "
                      "processes). For the old batch_size B with grad_accum A on 1 process, write "
                      "batch_size: B*A and micro_batch_size: B",
    }

    def micro_and_accumulation(self, processes: int) -> tuple[int, int]:
        """``(micro_batch_size, accumulation)`` on ``processes`` devices.

        Raises:
            ConfigError: the global batch does not split into whole micro-batches on every process.
        """
        where = f"stages.{self.name}"
        micro = self.micro_batch_size
        if micro is None:
            if self.batch_size % processes:
                raise ConfigError(
                    f"{where}.batch_size={self.batch_size} (the global batch) does not divide over {processes} processes; "
                    f"use a multiple of {processes} or set {where}.micro_batch_size"
                )
            return self.batch_size // processes, 1
        if self.batch_size % (micro * processes):
            raise ConfigError(
                f"{where}.batch_size={self.batch_size} (the global batch) is not a multiple of micro_batch_size={micro} x "
                f"{processes} process(es) = {micro * processes}; choose a batch_size that is, or another micro_batch_size"
            )
        return micro, self.batch_size // (micro * processes)

    def __post_init__(self) -> None:
        where = f"stages.{self.name}"
        unknown = set(self.policy) - set(PARTS)
        if unknown:
            raise ConfigError(f"{where}.policy has unknown part(s) {sorted(unknown)}; valid parts: {', '.join(PARTS)}")
        self.policy.update(complete_policy(self.policy))
        for part in PARTS:
            _check_choice(f"{where}.policy.{part}", self.policy[part], POLICIES)
        if all(self.policy[p] == "frozen" for p in PARTS):
            raise ConfigError(f"{where}.policy freezes every part; at least one must be full or lora")
        _check_positive(f"{where}.epochs", self.epochs)
        _check_positive(f"{where}.max_steps", self.max_steps)
        _check_positive(f"{where}.batch_size", self.batch_size)
        _check_positive(f"{where}.micro_batch_size", self.micro_batch_size)
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ConfigError(f"{where}.micro_batch_size={self.micro_batch_size} is larger than the global "
                              f"{where}.batch_size={self.batch_size}")
        _check_positive(f"{where}.lr", self.lr)
        for part, scale in self.lr_scale.items():
            if part not in PARTS:
                raise ConfigError(f"{where}.lr_scale has unknown part {part!r}; valid parts: {', '.join(PARTS)}")
            _check_positive(f"{where}.lr_scale.{part}", scale)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}.betas={self.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        _check_positive(f"{where}.eps", self.eps)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{where}.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{where}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


STRATEGIES = ("auto", "none", "ddp", "fsdp", "deepspeed")


@dataclass
class FsdpConfig:
    sharding: str = "full"
    """``full``: parameters, gradients and optimizer states sharded over all processes (ZeRO-3 style);
    ``hybrid``: sharded within a node and replicated across nodes (HSDP: less inter-node traffic)."""
    wrap: list[str] | None = None
    """Module class names sharded as one unit each; ``None``: the layer classes of the language backbone
    and the vision tower (their ``_no_split_modules``), then each part, then the whole model."""
    reshard_after_forward: bool = True
    """Free the gathered parameters after each unit's forward (less memory, one more all-gather in backward)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer states in CPU memory (GPU runs that do not fit otherwise)."""

    def __post_init__(self) -> None:
        _check_choice("train.fsdp.sharding", self.sharding, ("full", "hybrid"))


@dataclass
class TrainConfig:
    seed: int = 0
    """Seed for weights, data order and dropout."""
    precision: str = "fp32"
    """fp32 or bf16 (autocast)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    output_dir: str = "runs/default"
    """Run folder: resolved config, logs, checkpoints, stage outputs and the final model."""
    log_every: int = 10
    """Optimizer steps between metric log lines."""
    save_every: int = 0
    """Optimizer steps between resumable checkpoints (0: only at the end of each stage)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept per stage (oldest deleted first)."""
    threads: int | None = None
    """torch CPU threads; ``None`` keeps torch's default."""
    progress: bool = True
    """Show a progress bar."""
    export: list[str] = field(default_factory=list)
    """Checkpoint formats the final model is also written in, each to ``OUTPUT_DIR/model-FORMAT``
    (``hf-llava``, ``hf-blip2``, ``llava-original``); checked against the model before the first step."""
    strategy: str = "auto"
    """How processes share the work under ``torchrun`` / ``accelerate launch``: ``ddp`` (PyTorch
    DistributedDataParallel: every process holds the model), ``fsdp`` (PyTorch FSDP2: parameters,
    gradients and optimizer states sharded), ``deepspeed`` (ZeRO, see ``deepspeed``), ``none`` (one
    process), ``auto`` (ddp when launched on several processes, else none)."""
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    """FSDP options (``strategy: fsdp``)."""
    deepspeed: str = "zero2"
    """DeepSpeed config (``strategy: deepspeed``): a shipped one (``zero2``, ``zero3``, ``zero3-offload``;
    ``vlmkit list deepspeed``) or a JSON file. Its batch, accumulation, clipping and precision fields are
    filled from the recipe; values that contradict the recipe are refused."""
    rank0_loading: bool = True
    """Under a launcher with several processes, only rank 0 reads the pretrained weights; the others
    build the model on the meta device and get rank 0's weights when the strategy wraps the model (host
    memory: one copy per node instead of one per process). ``false``: every process reads them. Models
    from ``model.pretrained`` are read by every process."""

    def __post_init__(self) -> None:
        _check_choice("train.strategy", self.strategy, STRATEGIES)
        _check_choice("train.precision", self.precision, ("fp32", "bf16"))
        from vlmkit.formats import FORMATS

        for fmt in self.export:
            _check_choice("train.export", fmt, [n for n, f in FORMATS.items() if f.writable and n != "vlmkit"])
        _check_positive("train.log_every", self.log_every)
        _check_positive("train.save_every", self.save_every, allow_zero=True)
        _check_positive("train.keep_checkpoints", self.keep_checkpoints)


@dataclass
class EvalConfig:
    task: str = "easyvqa"
    """Evaluation task run after training: any ``vlmkit eval --task`` name (easyvqa, vqav2, pope, ...)."""
    data: str | None = None
    """The task's data folder or its main file (``vlmkit eval --data TASK=PATH``); easy-VQA needs none."""
    files: dict[str, str] = field(default_factory=dict)
    """Single files or folders of the task by role (``--data TASK.ROLE=PATH``), e.g. ``{images: /data/val2014}``."""
    split: str = "test"
    """Split of the task's data."""
    batch_size: int = 64
    """Questions per generation batch."""
    limit: int | None = None
    """Only the first N questions."""
    max_new_tokens: int = 16
    """Longest generated answer."""

    def __post_init__(self) -> None:
        if not self.task or not isinstance(self.task, str):
            raise ConfigError(f"eval.task must be a task name, got {self.task!r}")
        _check_positive("eval.batch_size", self.batch_size)
        _check_positive("eval.max_new_tokens", self.max_new_tokens)
        _check_positive("eval.limit", self.limit)

    def data_arguments(self) -> list[str]:
        """The section's paths as ``vlmkit eval --data`` values."""
        values = [f"{self.task}={self.data}"] if self.data else []
        return values + [f"{self.task}.{role}={path}" for role, path in self.files.items()]


#: benchmark names a recipe's published scores may use (``vlmkit list recipes`` shows them in this order)
BENCHMARKS = ("VQAv2", "GQA", "VizWiz", "ScienceQA-IMG", "ScienceQA", "TextVQA", "POPE", "MME", "MMBench", "MM-Vet",
              "OK-VQA", "COCO-CIDEr")


@dataclass
class PublishedConfig:
    """What the system a recipe reproduces published, so a user knows what a faithful run should reach."""

    system: str = ""
    """The system's name as published (e.g. ``LLaVA-1.5-7B``)."""
    source: str = ""
    """Where the recipe's numbers come from: the paper (arXiv id, section, table) and/or the official
    repository's training script."""
    gpus: str = ""
    """The hardware the published run used (e.g. ``8 x A100-80GB``)."""
    scores: dict[str, float] = field(default_factory=dict)
    """Headline scores the paper reports, by benchmark (see :data:`BENCHMARKS`); MME is perception."""
    notes: str = ""
    """Where the recipe departs from the publication, and why."""

    def __post_init__(self) -> None:
        for name, value in self.scores.items():
            _check_choice("published.scores", name, BENCHMARKS)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"published.scores.{name}={value!r} must be a number")


@dataclass
class RecipeConfig:
    name: str = "custom"
    """Recipe name."""
    description: str = ""
    """One line on what the recipe trains and where its numbers come from."""
    published: PublishedConfig = field(default_factory=PublishedConfig)
    """The published system the recipe reproduces (shown by ``vlmkit list recipes``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=list)
    """Training stages, run in order."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig | None = None
    """Evaluation after the last stage; ``None`` skips it."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"stage names must be unique; repeated: {', '.join(dupes)}")

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in self.stages)}")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass

def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} may not be null")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively.

    Raises:
        ConfigError: an unknown key (the message lists valid keys), a value of the wrong type, or a
            value rejected by ``__post_init__``.
    """
    if isinstance(data, cls):
        return data
    label = where or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    removed = getattr(cls, "removed_keys", {})
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key in removed:
            raise ConfigError(f"{dotted} is no longer a setting: {removed[key]}")
        if key not in valid:
            raise ConfigError(f"unknown config key {dotted!r}; valid keys here: {', '.join(valid)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain-data copy of a config dataclass (for YAML/JSON)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else copy.deepcopy(obj)


# ---------------------------------------------------------------------------------------------
# YAML and overrides

def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value.

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. train.seed=3)")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw recipe mapping (copy returned).

    A list segment (``stages``) takes an index or a stage ``name``. Unknown keys are caught when the
    result is turned into a :class:`RecipeConfig`.
    """
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            where = ".".join(keys[: i + 1])
            if isinstance(node, list):
                node = node[_list_index(node, key, where)]
            else:
                node = node.setdefault(key, {})
                if node is None:
                    node = {}
                    _set(data, keys[: i + 1], node)
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {text!r}: {where} is a value, not a section")
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, text)] = value
        else:
            node[last] = value
    return data


def _set(data: Any, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data[_list_index(data, key, key)] if isinstance(data, list) else data[key]
    if isinstance(data, list):
        data[_list_index(data, keys[-1], keys[-1])] = value
    else:
        data[keys[-1]] = value


def _list_index(items: list[Any], key: str, where: str) -> int:
    if key.lstrip("-").isdigit():
        index = int(key)
        if -len(items) <= index < len(items):
            return index
        raise ConfigError(f"{where}: index {index} is out of range (list has {len(items)} items)")
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if key in names:
        return names.index(key)
    raise ConfigError(f"{where}: no item named {key!r}; names: {', '.join(map(str, names))}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping. Raises :class:`ConfigError` naming the file on a parse error or a non-mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a folder, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _load_recipe_data(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe mapping, resolving ``base``: a recipe may name another (``base: llava15-7b``) and list
    dotted ``overrides`` of it; its other top-level keys (``name``, ``description``...) replace the base's.

    Raises:
        ConfigError: a ``base`` cycle, or ``overrides`` that is not a list of ``key=value`` strings.
    """
    from vlmkit.recipes import recipe_path

    data = load_yaml(path)
    if "base" not in data:
        return data
    if path.resolve() in seen:
        raise ConfigError(f"{path}: recipe bases form a cycle: {' -> '.join(str(p) for p in (*seen, path.resolve()))}")
    changes = data.pop("overrides", [])
    if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
        raise ConfigError(f"{path}: 'overrides' must be a list of key.path=value strings")
    base = _load_recipe_data(recipe_path(str(data.pop("base"))), (*seen, path.resolve()))
    return {**apply_overrides(base, changes), **data}


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Load a shipped recipe by name (``vlmkit list recipes``) or a YAML file (resolving its ``base``),
    then apply overrides."""
    from vlmkit.recipes import recipe_path

    path = recipe_path(str(name_or_path))
    data = apply_overrides(_load_recipe_data(path), overrides or [])
    try:
        recipe = from_dict(RecipeConfig, data)
        if recipe.eval is not None:
            from vlmkit.evaluation.tasks.base import eval_task_data

            eval_task_data(recipe.eval)  # the task and its files, before any training step
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return recipe


def save_yaml(config: Any, path: str | Path) -> None:
    """Write a config dataclass (or mapping) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
