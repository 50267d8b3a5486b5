"""Trainability policies: a stage declares, per part, frozen / full / lora; this applies it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vlmkit.config import LoraSettings, complete_policy
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.training.lora import apply_lora, has_lora

log = logging.getLogger("vlmkit")


@dataclass(frozen=True)
class PartReport:
    """Parameter counts of one part after a policy is applied."""

    part: str
    policy: str
    total: int
    trainable: int


def apply_policy(model: VisionLanguageModel, policy: dict[str, str], lora: LoraSettings) -> list[PartReport]:
    """Set ``requires_grad`` (and LoRA adapters) so exactly the declared parts train.

    Frozen parts are put in eval mode so normalisation statistics and dropout do not change them.

    Task heads outside the language model's transformers model (encoder-only backbones) train
    whenever the language part is not frozen, LoRA included.

    Raises:
        ValueError: ``lora`` requested for the connector or fusion blocks (small; train them ``full``).
    """
    policy = complete_policy(policy)
    reports = []
    for name, part in model.parts().items():
        mode = policy[name]
        if mode == "lora":
            if name in ("connector", "fusion"):
                raise ValueError(f"policy {name}=lora is not supported; the {name} is small, use 'full' or 'frozen'")
            if not has_lora(part):
                for p in part.parameters():
                    p.requires_grad_(False)
                targets = part.spec.lora_targets if name == "language" else None
                apply_lora(part, lora, targets)
        else:
            for p in part.parameters():
                p.requires_grad_(mode == "full")
        if name == "vision" and mode != "frozen":
            _freeze_unused(part)
        if name == "language" and mode != "frozen":
            for p in part.extra_parameters():
                p.requires_grad_(True)
        total = sum(p.numel() for p in part.parameters())
        trainable = sum(p.numel() for p in part.parameters() if p.requires_grad)
        reports.append(PartReport(name, mode, total, trainable))
    set_train_modes(model, policy)
    return reports


def _freeze_unused(vision) -> None:
    """Freeze tower parameters that the selected feature layer does not use (see
    :meth:`VisionEncoder.unused_parameters`)."""
    unused = set(vision.unused_parameters())
    frozen = []
    for n, p in vision.tower.named_parameters():
        if n in unused and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(n)
    if frozen:
        log.info("vision: %d parameter tensor(s) unused by feature_layer=%d stay frozen (e.g. %s)", len(frozen), vision.feature_layer, frozen[0])


def format_policy(stage: str, reports: list[PartReport]) -> str:
    """One table of the policy with parameter counts, logged once per stage."""
    lines = [f"stage {stage!r} trainability:"]
    for r in reports:
        lines.append(f"  {r.part:<10} {r.policy:<7} {r.trainable:>13,} / {r.total:>13,} trainable")
    total = sum(r.total for r in reports)
    trainable = sum(r.trainable for r in reports)
    lines.append(f"  {'total':<10} {'':<7} {trainable:>13,} / {total:>13,} trainable ({100 * trainable / max(total, 1):.2f}%)")
    return "\n".join(lines)


def set_train_modes(model: VisionLanguageModel, policy: dict[str, str]) -> None:
    """Training mode for parts that train, eval mode for frozen ones (no BatchNorm/dropout drift)."""
    policy = complete_policy(policy)
    for name, part in model.parts().items():
        part.train(policy[name] != "frozen")
