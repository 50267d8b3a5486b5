"""The model a recipe builds, without its weights: built on the meta device, sized exactly.

The real builder (:func:`vlmkit.models.build.build_model`) runs on the meta device from the configs of
:func:`~vlmkit.planning.architectures.offline_model_config`, then a stage's trainability policy is
applied with the trainer's own :func:`~vlmkit.training.policy.apply_policy` (LoRA through peft), so
every count below is the count a training run logs, with no byte of weights allocated. Every language
model kind is built: decoder-only, encoder-decoder (Flan-T5) and encoder-only (RoBERTa, whose answer
classifier is sized by ``model.answers``, or by :data:`DEFAULT_ANSWERS` answers while that is empty).

What a config alone does not say is put right after the build: a checkpoint whose config keeps an
output head of its own (``tie_word_embeddings: false``) is untied, even where transformers builds the
architecture tied from a config (T5 in transformers 5 always ties then; a checkpoint that holds both
tensors loads untied, as Flan-T5-XL's published 2.85B parameters count them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from vlmkit.config import ModelConfig, StageConfig
from vlmkit.planning.architectures import checkpoint_head_untied, offline_model_config

#: answers an encoder-only model is sized for while ``model.answers`` is empty (`vlmkit train` builds the
#: vocabulary from the training data): the 3,129 answers of the usual VQAv2 classification vocabulary
DEFAULT_ANSWERS = 3129
#: text a stand-in tokenizer is trained on; the real vocabulary size comes from the model config
_PROBE_TEXTS = ("What shape is in the image?", "circle", "What color is the shape?", "blue")
_PROBE_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
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
        num_image_tokens: placeholder tokens per image in the language sequence (the connector's
            output tokens for prefix fusion, 1 for cross-attention).
        media_tokens: visual tokens per image the connector emits (with cross-attention they enter
            through the fusion blocks, not the sequence).
        image_size: the tower's input resolution.
        vocab_size: rows of the language model's output head (answers of an encoder-only classifier).
        kind: the language model's kind (decoder, encoder-decoder, encoder).
    """

    model: nn.Module
    counts: list[PartCount]
    dtype: str
    num_image_tokens: int
    image_size: int
    vocab_size: int
    media_tokens: int = 0
    kind: str = "decoder"

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


def build_meta_model(cfg: ModelConfig, answers: int = DEFAULT_ANSWERS) -> tuple[nn.Module, object]:
    """``(model, processor)`` of ``cfg`` on the meta device, hub checkpoints replaced by their known
    architectures (no download, no weights). ``answers``: the size of an encoder-only model's answer
    vocabulary when ``model.answers`` is empty.

    Raises:
        ConfigError: a pretrained source that cannot be sized offline (see
            :func:`~vlmkit.planning.architectures.offline_model_config`).
        ValueError, RegistryError: what the builder raises for a bad model section.
    """
    from vlmkit.fileio import quiet_hf_progress
    from vlmkit.models.build import backbone_spec, build_model
    from vlmkit.processing.tokenizer import train_bpe_tokenizer

    offline = offline_model_config(cfg)
    if backbone_spec(offline).kind == "encoder" and not offline.answers:
        offline.answers = [f"answer {i}" for i in range(answers)]
    # the tokenizer only sizes the vocabulary, which offline_model_config fixed in the language config; it
    # carries a chat template so that `template: tokenizer` (the checkpoint's own) builds as with the real one
    tokenizer = train_bpe_tokenizer(_PROBE_TEXTS, 300)
    tokenizer.chat_template = _PROBE_CHAT_TEMPLATE
    with quiet_hf_progress(), torch.device("meta"):
        model, processor = build_model(offline, tokenizer=tokenizer)
        if checkpoint_head_untied(cfg):
            _untie_output_head(model.language.hf_model)
    return model, processor


def _untie_output_head(hf_model: nn.Module) -> None:
    """Give ``hf_model`` an output head of its own where the build tied it to the input embeddings."""
    head, embeddings = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if head is not None and head.weight is embeddings.weight:
        head.weight = nn.Parameter(torch.empty_like(embeddings.weight, device="meta"))
        hf_model.config.tie_word_embeddings = False  # so no later tie_weights() ties them again


def count_parts(model: nn.Module) -> dict[str, int]:
    """Parameters per part (``vision``, ``connector``, ``fusion``, ``language``) of a built model."""
    return {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()}


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per part of the model ``cfg`` builds, without downloading anything; remembered per
    configuration in the user's cache (see :func:`vlmkit.planning.counts.parameter_counts`)."""
    from vlmkit.planning.counts import parameter_counts as cached

    return cached(cfg)


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
    answers = getattr(model.language, "answers", None)
    return Skeleton(model=model, counts=counts, dtype=dtype, num_image_tokens=model.num_image_tokens,
                    image_size=model.vision.image_size,
                    vocab_size=int(head.weight.shape[0]) if head is not None else len(answers or ()),
                    media_tokens=model.connector.num_output_tokens, kind=model.language.spec.kind)
