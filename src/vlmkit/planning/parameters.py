"""The parameter facts the memory model needs from a stage's meta-device model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlmkit.planning.skeleton import Skeleton


@dataclass(frozen=True)
class ParameterStats:
    """Parameter counts of one stage's model (elements, not bytes, except where named).

    Attributes:
        total / trainable / lora: every parameter; those with gradients; LoRA adapters among them.
        weight_bytes / trainable_bytes / lora_bytes: their bytes in the dtypes the parameters have
            (``model.dtype``; peft keeps LoRA adapters of a bf16/fp16 model in float32). Gradients and
            AdamW states take the dtype of their parameter.
        buffer_bytes: bytes of the model's buffers (rotary tables, norm statistics).
        sizes: elements of every parameter tensor (DeepSpeed keeps the small ones whole).
        largest_unit / largest_unit_trainable: parameters (and trainable ones) of the largest FSDP unit:
            a layer of the vision tower or language model, else what a part or the model holds besides
            its layers (see :func:`fsdp_unit_sizes`).
        largest_group_bytes: bytes of the largest AdamW parameter group (per part, decayed or not, as
            the trainer groups them): the foreach implementation's temporaries are this big.
        largest_tensor_bytes: bytes of the largest trainable tensor (the per-tensor AdamW's temporaries).
    """

    total: int
    trainable: int
    lora: int
    weight_bytes: int
    trainable_bytes: int
    lora_bytes: int
    buffer_bytes: int
    sizes: tuple[int, ...]
    largest_unit: int
    largest_unit_trainable: int
    largest_group_bytes: int
    largest_tensor_bytes: int


def parameter_stats(skeleton: Skeleton, fsdp_wrap: list[str] | None = None) -> ParameterStats:
    """:class:`ParameterStats` of a stage's skeleton; ``fsdp_wrap``: ``train.fsdp.wrap``."""
    model = skeleton.model
    params = list(model.named_parameters())  # tied weights once
    trainable = [(n, p) for n, p in params if p.requires_grad]
    groups: dict[tuple[str, bool], int] = {}
    for name, p in trainable:  # the trainer's AdamW groups: per part x (decayed, not decayed)
        key = (name.split(".", 1)[0], p.ndim >= 2 and "norm" not in name.lower())
        groups[key] = groups.get(key, 0) + _bytes(p)
    units = fsdp_unit_sizes(model, fsdp_wrap)
    largest = max(units, default=(0, 0))
    return ParameterStats(
        total=skeleton.total, trainable=skeleton.trainable, lora=skeleton.lora,
        weight_bytes=sum(_bytes(p) for _, p in params), trainable_bytes=sum(_bytes(p) for _, p in trainable),
        lora_bytes=sum(_bytes(p) for n, p in trainable if "lora_" in n),
        buffer_bytes=sum(_bytes(b) for b in model.buffers()), sizes=tuple(p.numel() for _, p in params),
        largest_unit=largest[0], largest_unit_trainable=largest[1], largest_group_bytes=max(groups.values(), default=0),
        largest_tensor_bytes=max((_bytes(p) for _, p in trainable), default=0),
    )


def _bytes(t) -> int:
    return t.numel() * t.element_size()


def fsdp_unit_sizes(model: nn.Module, wrap: list[str] | None) -> list[tuple[int, int]]:
    """``(parameters, trainable parameters)`` of each unit FSDP2 shards and gathers as one, by the
    trainer's own rule (:func:`vlmkit.training.strategies.fsdp_units`, then the whole model); a unit
    holds the parameters none of the units inside it holds."""
    from vlmkit.training.strategies import fsdp_units

    units = [*fsdp_units(model, wrap), model]
    claimed: set[int] = set()
    sizes = []
    for unit in units:
        own = [p for p in unit.parameters() if id(p) not in claimed]
        claimed |= {id(p) for p in own}
        if own:
            sizes.append((sum(p.numel() for p in own), sum(p.numel() for p in own if p.requires_grad)))
    return sizes
