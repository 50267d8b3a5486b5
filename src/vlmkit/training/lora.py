"""LoRA as a transform on one part of the model, through peft.

A part under LoRA is wrapped in a ``peft.PeftModel``; adapters are saved in peft's own format
(``adapter_config.json`` + ``adapter_model.safetensors``) so ``PeftModel.from_pretrained`` reads
them, and merged into the base weights at the end of a stage.
"""

from __future__ import annotations

from pathlib import Path

import peft
from torch import nn

from vlmkit.config import LoraSettings


def _holder(part: nn.Module) -> tuple[nn.Module, str]:
    """The object and attribute that hold the Hugging Face model of a part."""
    if hasattr(part, "tower"):  # VisionEncoder
        return part, "tower"
    if hasattr(part, "model"):  # CausalLanguageModel
        return part, "model"
    raise TypeError(f"LoRA is supported on the vision and language parts, not on {type(part).__name__}")


def has_lora(part: nn.Module) -> bool:
    """Whether the part currently carries LoRA adapters."""
    try:
        owner, attr = _holder(part)
    except TypeError:
        return False
    return isinstance(getattr(owner, attr), peft.PeftModel)


def apply_lora(part: nn.Module, settings: LoraSettings, default_targets: tuple[str, ...] | None) -> None:
    """Wrap the part's Hugging Face model with LoRA adapters (base weights frozen by peft).

    ``settings.target_modules`` wins; else ``default_targets``; else every linear layer.

    Raises:
        ValueError: no module of the model matches the targets (names them).
    """
    owner, attr = _holder(part)
    model = getattr(owner, attr)
    if isinstance(model, peft.PeftModel):
        raise ValueError("this part already has LoRA adapters; merge them (end of stage) before adding new ones")
    targets = settings.target_modules or (list(default_targets) if default_targets else "all-linear")
    if isinstance(targets, list):
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        if not names & set(targets):
            raise ValueError(f"LoRA target_modules {targets} match no module of {type(model).__name__}; module names include {sorted(names)[:30]}")
        present = [t for t in targets if t in names]
        targets = present
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets)
    setattr(owner, attr, peft.get_peft_model(model, config))


def save_lora(part: nn.Module, folder: str | Path) -> None:
    """Save the part's adapters in peft format into ``folder``.

    The input/output embeddings are saved with them exactly when the part's pretrained embeddings
    were resized for added tokens (``embeddings_resized``), decided here rather than by peft's
    "auto", which reads the base model's config and may query the Hub to do so.
    """
    owner, attr = _holder(part)
    resized = bool(getattr(part, "embeddings_resized", False))
    getattr(owner, attr).save_pretrained(str(folder), save_embedding_layers=resized)


def merge_lora(part: nn.Module) -> None:
    """Fold the adapters into the base weights and drop the peft wrapper (no-op without LoRA)."""
    if has_lora(part):
        owner, attr = _holder(part)
        setattr(owner, attr, getattr(owner, attr).merge_and_unload())


def load_lora(part: nn.Module, folder: str | Path) -> None:
    """Attach adapters saved by :func:`save_lora` to the part (for evaluation or merging)."""
    owner, attr = _holder(part)
    setattr(owner, attr, peft.PeftModel.from_pretrained(getattr(owner, attr), str(folder)))
