"""The model a recipe builds, without its weights: built on the meta device, sized exactly.

The real builder (:func:`vlmkit.models.build.build_model`) runs on the meta device from the configs of
:func:`~vlmkit.planning.architectures.offline_model_config`, then a stage's trainability policy is
applied with the trainer's own :func:`~vlmkit.training.policy.apply_policy` (LoRA through peft), so
every count below is the count a training run logs, with no byte of weights allocated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.config import ConfigError, ModelConfig, StageConfig
from vlmkit.planning.architectures import offline_model_config

#: text a stand-in tokenizer is trained on; the real vocabulary size comes from the model config
_PROBE_TEXTS = ("What shape is in the image?", "circle", "What color is the shape?", "blue")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class PartCount:
    """Parameters of one part under a stage's policy.

    Attributes:
        part: vision, connector, fusion or language.
        policy: frozen, full or lora.
        total: every parameter of the part, LoRA adapters included.
        trainable: parameters that get gradients (adapters, or the whole part).
        lora: LoRA adapter parameters (trainable) among them.
    """

    part: str
    policy: str
    total: int
    trainable: int
    lora: int


@dataclass
class Skeleton:
    """A meta-device model under one stage's policy, and what the memory model needs from it.

    Attributes:
        model: the :class:`~vlmkit.models.vlm.VisionLanguageModel` (parameters on the meta device).
        counts: per part, in ``model.part_names`` order.
        dtype: the weights' dtype name (``model.dtype``).
        num_image_tokens: placeholder tokens per image in the language sequence.
        image_size: the tower's input resolution.
        vocab_size: rows of the language model's output head.
    """

    model: nn.Module
    counts: list[PartCount]
    dtype: str
    num_image_tokens: int
    image_size: int
    vocab_size: int

    @property
    def total(self) -> int:
        return sum(c.total for c in self.counts)

    @property
    def trainable(self) -> int:
        return sum(c.trainable for c in self.counts)

    @property
    def lora(self) -> int:
        return sum(c.lora for c in self.counts)

    def trains(self, part: str) -> bool:
        return next(c.trainable > 0 for c in self.counts if c.part == part)


def build_meta_model(cfg: ModelConfig) -> tuple[nn.Module, object]:
    """``(model, processor)`` of ``cfg`` on the meta device, hub checkpoints replaced by their known
    architectures (no download, no weights).

    Raises:
        ConfigError: a pretrained source that cannot be sized offline (see
            :func:`~vlmkit.planning.architectures.offline_model_config`).
        ValueError, RegistryError: what the builder raises for a bad model section.
    """
    from vlmkit.fileio import quiet_hf_progress
    from vlmkit.models.build import backbone_spec, build_model
    from vlmkit.processing.tokenizer import train_bpe_tokenizer

    offline = offline_model_config(cfg)
    spec = backbone_spec(offline)
    if spec.kind != "decoder":
        raise ConfigError(f"model.language.backbone={offline.language.backbone!r} is {spec.kind}; vlmkit plan models "
                          "decoder-only language models so far")
    # the tokenizer only sizes the vocabulary, which offline_model_config fixed in the language config
    tokenizer = train_bpe_tokenizer(_PROBE_TEXTS, 300)
    with quiet_hf_progress(), torch.device("meta"):
        return build_model(offline, tokenizer=tokenizer)


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per part (``vision``, ``connector``, ``fusion``, ``language``) of the model ``cfg``
    builds, counted on the meta device without downloading anything (see :func:`build_meta_model`)."""
    model, _ = build_meta_model(cfg)
    return {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()}


def stage_skeleton(base: nn.Module, stage: StageConfig, dtype: str) -> Skeleton:
    """A copy of the meta model ``base`` with ``stage``'s policy applied, and its parameter counts.

    Raises:
        ValueError: a policy the trainer refuses (e.g. LoRA on the connector), or LoRA targets that
            match no module.
    """
    from vlmkit.training.policy import apply_policy

    model = copy.deepcopy(base)
    with torch.device("meta"):  # LoRA adapters are created without memory too
        reports = apply_policy(model, stage.policy, stage.lora)
    counts = []
    for report in reports:
        part = getattr(model, report.part)
        lora = sum(p.numel() for n, p in part.named_parameters() if p.requires_grad and "lora_" in n)
        counts.append(PartCount(report.part, report.policy, report.total, report.trainable, lora))
    head = model.language.hf_model.get_output_embeddings()
    return Skeleton(model=model, counts=counts, dtype=dtype, num_image_tokens=model.num_image_tokens,
                    image_size=model.vision.image_size, vocab_size=int(head.weight.shape[0]))
