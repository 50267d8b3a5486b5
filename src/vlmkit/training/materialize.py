"""Models built without weights on the processes that are not rank 0, and given rank 0's weights.

Under a launcher with several processes (``train.rank0_loading``), only rank 0 reads the pretrained
weights; every other process builds the same architecture on the meta device (no storage; see
:func:`vlmkit.models.hf_config.without_weights`), so a node holds one copy of the weights in host memory
instead of one per process. When a strategy wraps the model, those processes allocate it on their
device (:func:`allocate`) and receive rank 0's parameters and buffers (:func:`take_weights_from_rank0`;
DDP's constructor does the copy itself). FSDP hands a stage's model back the same way: gathered into
rank 0's host memory, on the meta device elsewhere.

Allocation and copies go by tensor, so weights that are tied (one tensor under several names, such as
input embeddings and output head) must be tied again afterwards: :func:`tie_groups` records them and
:func:`retie` restores exactly those, whatever the model's config says (a Flan-T5 checkpoint loads with
its own head although its config ties them).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from vlmkit import distributed as dist


def has_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device (has no storage)."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def structure(model: nn.Module) -> list[tuple[Any, ...]]:
    """What must be equal on every process for rank 0's weights to fit: every parameter's and
    buffer's name, shape and dtype, and for each parameter the first name of the tensor it shares."""
    first: dict[int, str] = {}
    out: list[tuple[Any, ...]] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        out.append(("parameter", name, tuple(p.shape), str(p.dtype), first.setdefault(id(p), name)))
    for name, b in model.named_buffers(remove_duplicate=False):
        out.append(("buffer", name, tuple(b.shape), str(b.dtype)))
    return out


def first_difference(mine: list[tuple[Any, ...]], reference: list[tuple[Any, ...]]) -> str:
    """The first entry where two :func:`structure` lists differ, in words."""
    for a, b in itertools.zip_longest(mine, reference):
        if a != b:
            return f"this process has {a or 'nothing'}, rank 0 has {b or 'nothing'}"
    return "nowhere"


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names of the parameters that share one tensor, per tensor (groups of two or more)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Make the names of each group (from :func:`tie_groups` before a copy, a reallocation or a load
    with ``assign=True`` separated them) share the first name's parameter again."""
    for first, *others in groups:
        param = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)


def to_device(model: nn.Module) -> bool:
    """Move ``model`` to this process's device unless it is (partly) on the meta device, which has no
    values to move (see :func:`allocate`). Returns whether it was moved."""
    if has_meta(model):
        return False
    model.to(dist.device())
    return True


def allocate(model: nn.Module) -> None:
    """Put ``model`` on this process's device: one with storage is moved there, one on the meta device
    gets uninitialised storage there (ties kept), whose values must come from elsewhere (rank 0)."""
    if to_device(model):
        return
    groups = tie_groups(model)
    model.to_empty(device=dist.device())
    retie(model, groups)


def broadcast_module(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (collective)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(t.data, src=0)


def take_weights_from_rank0(model: nn.Module) -> None:
    """Collective: allocate a model built without weights (see :func:`allocate`), then copy rank 0's
    parameters and buffers (non-persistent ones such as rotary frequencies included) to every process."""
    allocate(model)
    if dist.world_size() > 1:
        broadcast_module(model)
