"""How the processes of a run share a stage's work: one registry entry per strategy.

``none`` (one process), ``ddp`` (PyTorch ``DistributedDataParallel``), ``fsdp`` (PyTorch FSDP2,
``fully_shard``) and ``deepspeed`` (ZeRO, :mod:`vlmkit.training.deepspeed`). vlmkit adds no
distributed machinery of its own: each strategy wraps the model and optimizer with the library's
own classes and exposes the handful of operations the trainer needs (a forward module, backward,
clipping, the optimizer step, checkpoint state, and the plain model back at the end of the stage).

Every strategy gives the trainer the same contract: the loss it back-propagates on each process is
``sum of that process's target losses x world size / targets of the global batch``; the strategies
average gradients over processes, so every process ends with the gradient of the mean loss over the
global batch, whatever the split.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from vlmkit import distributed as dist
from vlmkit.config import ConfigError, TrainConfig
from vlmkit.registry import Registry
from vlmkit.training.materialize import allocate, retie, take_weights_from_rank0, tie_groups

log = logging.getLogger("vlmkit")

GroupsFn = Callable[[list[tuple[str, nn.Parameter]]], list[dict[str, Any]]]
SchedulerFn = Callable[[torch.optim.Optimizer], Any]


class Strategy(abc.ABC):
    """One stage's model, optimizer and scheduler as a strategy wraps them.

    Use: :meth:`prepare` once, then per optimizer step :meth:`sync` + :meth:`backward` for each
    micro-batch, then :meth:`step` (clipping included); :meth:`state_dicts` / :meth:`load_state_dicts`
    for checkpoints; :meth:`unwrap` at the end for the plain model.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, train: TrainConfig):
        self.train = train
        self.model: nn.Module | None = None  # the plain model
        self.module: nn.Module | None = None  # what the forward is called on
        self.optimizer: Any = None
        self.scheduler: Any = None

    @classmethod
    def check_available(cls) -> None:
        """Raise :class:`ConfigError` naming what the installed libraries lack for this strategy."""

    @abc.abstractmethod
    def prepare(self, model: nn.Module, groups: GroupsFn, scheduler: SchedulerFn, micro: int, accumulation: int,
                max_grad_norm: float | None) -> None:
        """Wrap ``model`` (already on this process's device, policy applied); build the optimizer from
        ``groups(named trainable parameters)`` and the scheduler from ``scheduler(optimizer)``. ``micro``
        and ``accumulation``: the per-device micro-batch and micro-batches per step."""

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward: ``last`` is the step's last micro-batch
        (where gradients are reduced across processes)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def step(self, max_grad_norm: float | None) -> float | None:
        """Clip the global gradient norm (when ``max_grad_norm`` is set), take the optimizer and
        scheduler step, clear the gradients. Returns the norm before clipping (``None`` unclipped)."""
        norm = None
        if max_grad_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(self.trainable(), max_grad_norm)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> None:
        """A step whose global batch had no targets: no update, the schedule moves on."""
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def last_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(model state, optimizer state)`` keyed by the plain model's parameter names, as
        ``torch.distributed.checkpoint`` saves them (sharded tensors stay sharded). Collective."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.module, self.optimizer)

    def load_state_dicts(self, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
        """Load what :meth:`state_dicts` gave (the model part may hold only the trainable tensors). Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(self.module, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(strict=False))

    def unwrap(self) -> nn.Module:
        """The plain model with the stage's trained weights (on every process)."""
        return self.model


STRATEGIES: Registry[type[Strategy]] = Registry("distributed strategy")

#: where FSDP2 lives (module, name)
FSDP_API = ("torch.distributed.fsdp", "fully_shard")


@STRATEGIES.register("none")
class LocalStrategy(Strategy):
    """One process: the model as it is."""

    name = "none"
    description = "one process, no wrapper"

    def prepare(self, model, groups, scheduler, micro, accumulation, max_grad_norm) -> None:
        self.model = self.module = model
        self.optimizer = torch.optim.AdamW(groups([(n, p) for n, p in model.named_parameters() if p.requires_grad]))
        self.scheduler = scheduler(self.optimizer)


@STRATEGIES.register("ddp")
class DDPStrategy(Strategy):
    """PyTorch ``DistributedDataParallel``: a full model per process, gradients all-reduced (averaged)
    once per optimizer step (``no_sync`` on the other micro-batches)."""

    name = "ddp"
    description = "PyTorch DistributedDataParallel: a full copy per process, gradients averaged"

    def prepare(self, model, groups, scheduler, micro, accumulation, max_grad_norm) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.model = model
        allocate(model)  # built without weights (train.rank0_loading): DDP's constructor copies rank 0's in
        if dist.initialized():
            dev = dist.device()
            self.module = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        else:
            self.module = model
        self.optimizer = torch.optim.AdamW(groups([(n, p) for n, p in model.named_parameters() if p.requires_grad]))
        self.scheduler = scheduler(self.optimizer)

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        if last or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()


@STRATEGIES.register("fsdp")
class FSDPStrategy(Strategy):
    """PyTorch FSDP2 (``fully_shard``): every parameter, gradient and optimizer state sharded over the
    processes (``full``) or over the processes of a node and replicated across nodes (``hybrid``).

    FSDP2 shards each parameter separately and keeps the original parameters (FSDP1's
    ``use_orig_params``), so frozen and trainable parameters, LoRA adapters included, mix freely in one
    unit. Units: the layer classes of the vision tower and the language backbone (their
    ``_no_split_modules``, or ``train.fsdp.wrap``), then the whole model, whose own unit holds the rest
    (embeddings, heads, connector, fusion blocks: the model calls methods of its parts such as
    ``language.embed``, which only a unit's ``forward`` would gather). Gradients are reduce-scattered
    (averaged) after every micro-batch, so accumulation holds only the shards.
    """

    name = "fsdp"
    description = "PyTorch FSDP2: parameters, gradients and optimizer states sharded (full or hybrid)"

    @classmethod
    def check_available(cls) -> None:
        import importlib

        module, name = FSDP_API
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise ConfigError(f"train.strategy=fsdp needs FSDP2 ({module}.{name}, torch >= 2.6); "
                              f"this torch is {torch.__version__}: use ddp or upgrade torch") from None

    def prepare(self, model, groups, scheduler, micro, accumulation, max_grad_norm) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        self.model = model
        dist.ensure_process_group()
        # every shard must come from the same weights (FSDP1's sync_module_states); processes that built
        # the model without weights (train.rank0_loading) allocate it first
        take_weights_from_rank0(model)
        self._ties = tie_groups(model)
        self._skeleton = meta_copy(model)
        options = self.train.fsdp
        kwargs: dict[str, Any] = {"mesh": self._mesh(), "reshard_after_forward": options.reshard_after_forward}
        if self.train.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if options.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        units = fsdp_units(model, options.wrap)
        unit_names = sorted({type(m).__name__ for m in units})
        for module in units:
            fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        log.info("fsdp: %d layer units (%s) + the rest of the model, sharding %s over %s", len(units),
                 ", ".join(unit_names) or "none", options.sharding, tuple(kwargs["mesh"].shape))
        self.module = model
        self.optimizer = torch.optim.AdamW(groups([(n, p) for n, p in model.named_parameters() if p.requires_grad]))
        self.scheduler = scheduler(self.optimizer)

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        dev = dist.device().type
        world = dist.world_size()
        if self.train.fsdp.sharding == "hybrid":
            local = dist.local_world_size()
            if world % local:
                raise ConfigError(f"train.fsdp.sharding=hybrid: {world} processes do not form whole nodes of {local}")
            return init_device_mesh(dev, (world // local, local), mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(dev, (world,), mesh_dim_names=("shard",))

    def unwrap(self) -> nn.Module:
        """The plain model: a copy built on the meta device before sharding, which rank 0 fills with the
        full weights gathered tensor by tensor into host memory; on the other processes it stays on the
        meta device (no memory) until the next stage's strategy or the end of the run gives them rank 0's
        weights (:func:`~vlmkit.training.materialize.take_weights_from_rank0`). The optimizer is dropped
        first, so the end of a stage holds no more than the shards on any device."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.optimizer = self.scheduler = None
        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        plain = self._skeleton
        if full:  # rank 0 (full_state_dict with cpu_offload gives the other ranks nothing)
            plain.load_state_dict(full, assign=True)
            retie(plain, self._ties)
        self.model = self.module = None
        return plain


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and persistent buffers are on the meta device
    (no memory); non-persistent buffers (rotary frequencies ...) are copied, since no state dict holds
    them. Fill it with ``load_state_dict(..., assign=True)``."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and id(b) not in memo:
                keep = name in module._non_persistent_buffers_set
                memo[id(b)] = b.clone() if keep else torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def fsdp_units(model: nn.Module, names: list[str] | None) -> list[nn.Module]:
    """The modules FSDP shards as units: instances of ``names`` or, when ``None``, of the layer
    classes the vision tower and the language backbone declare as unsplittable (``_no_split_modules``).

    Raises:
        ConfigError: ``names`` matches no module (lists the classes the model has).
    """
    if names is None:
        wanted: set[str] = set()
        for part in (getattr(model.vision, "tower", None), model.language.hf_model):
            wanted |= set(getattr(part, "_no_split_modules", None) or [])
    else:
        wanted = set(names)
    found = [m for m in model.modules() if type(m).__name__ in wanted and m is not model]
    if names is not None and not found:
        classes = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(f"train.fsdp.wrap={names} matches no module of the model; its classes include {', '.join(classes[:40])}")
    # a unit inside another unit is sharded first (fully_shard goes bottom-up)
    return sorted(found, key=lambda m: -depth_of(model, m))


def depth_of(root: nn.Module, target: nn.Module) -> int:
    for name, m in root.named_modules():
        if m is target:
            return name.count(".") + 1
    return 0


def resolve_strategy(train: TrainConfig) -> Strategy:
    """The configured strategy for this launch (``auto``: fsdp or deepspeed when ``accelerate launch
    --use_fsdp`` / ``--use_deepspeed`` started it, else ddp on several processes, else none).

    Raises:
        ConfigError: the strategy is unknown or unavailable in the installed libraries.
    """
    name = train.strategy
    if name == "auto":
        name = "ddp" if dist.world_size() > 1 else "none"
        for flag, chosen in (("ACCELERATE_USE_FSDP", "fsdp"), ("ACCELERATE_USE_DEEPSPEED", "deepspeed")):
            if os.environ.get(flag, "").lower() == "true":  # accelerate launch --use_fsdp / --use_deepspeed
                name = chosen
                log.info("train.strategy=auto: %s from accelerate launch (%s); its options come from train.%s", chosen, flag, chosen)
    if name == "none" and dist.world_size() > 1:
        raise ConfigError(f"train.strategy=none runs one process, but this launch has {dist.world_size()}; "
                          "use ddp, fsdp or deepspeed (or auto)")
    if name == "deepspeed":
        from vlmkit.training import deepspeed  # noqa: F401  (registers the strategy)
    cls = STRATEGIES.get(name)
    cls.check_available()
    return cls(train)


@contextlib.contextmanager
def autocast(precision: str) -> Iterator[None]:
    """bf16 autocast on this process's device when ``precision`` is ``bf16``."""
    dev = dist.device().type
    with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield
