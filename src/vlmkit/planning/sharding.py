"""Where each strategy keeps weights, gradients and optimizer states: one registry entry per strategy.

Every entry turns the parameter counts (:class:`~vlmkit.planning.parameters.ParameterStats`) into the
bytes one device holds, following what the trainer's strategy does (``vlmkit.training.strategies``):

* ``none`` / ``ddp``: everything replicated. torch AdamW keeps 2 states per trainable parameter in the
  parameter's dtype; gradients are in the parameter's dtype. DDP adds its gradient buckets, a second
  copy of the trainable gradients (``gradient_as_bucket_view`` is off).
* ``fsdp`` (FSDP2, ``fully_shard`` per layer, per part, then the model): weights, gradients and
  optimizer states divided by the shard group (all devices for ``full``, the devices of a node for
  ``hybrid``); during forward and backward the gathered parameters of the unit running and the one
  prefetched (in bf16 under mixed precision), and the unit's unsharded gradients before their
  reduce-scatter (plus an fp32 copy for ``reduce_dtype=float32``). ``cpu_offload`` moves the shards
  to host memory.
* ``deepspeed``: with bf16 enabled DeepSpeed holds the module in bf16 and an fp32 master partition in
  the optimizer: 12 bytes per trainable parameter (master + 2 Adam states, all fp32) divided by the
  devices. That holds for fp32 training too: ZeRO clones the fp32 partition into its master
  (``single_partition_of_fp32_groups``, DeepSpeed ``stage_1_and_2.py``). ZeRO-2 partitions gradients,
  ZeRO-3 also the weights (parameters below ``stage3_param_persistence_threshold`` stay whole) and
  gathers at most ``stage3_max_live_parameters`` at once. Reduce / all-gather buckets cost 4.5x their
  size with ``overlap_comm`` (DeepSpeed's configuration docs: "5e8 x 2 bytes x 2 x 4.5 = 9 GB").
  ``offload_optimizer`` / ``offload_param`` move states (and fp32 gradients) / weights to host memory.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from vlmkit.config import ConfigError
from vlmkit.planning.parameters import ParameterStats
from vlmkit.registry import Registry

FP32 = 4
BF16 = 2


@dataclass(frozen=True)
class Hardware:
    """The devices a plan is for.

    Attributes:
        gpus: devices (one process each) over all nodes.
        nodes: machines they are spread over (evenly).
        gpu_memory: bytes of memory per device.
        cpu_memory: bytes of host memory per node, when known (offload checks).
    """

    gpus: int
    nodes: int
    gpu_memory: int
    cpu_memory: int | None = None

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes


@dataclass(frozen=True)
class Setup:
    """How a stage trains, as far as memory goes: the strategy and its settings, resolved.

    Attributes:
        strategy: none, ddp, fsdp or deepspeed (``auto`` resolved).
        precision: fp32 or bf16.
        model_dtype: the weights' dtype name.
        fsdp_sharding / fsdp_cpu_offload / fsdp_reshard: ``train.fsdp`` settings.
        deepspeed: the DeepSpeed config name or path, and its ``zero_optimization`` section.
        foreach_adamw: AdamW's foreach implementation (PyTorch's default on CUDA; the CPU runs the
            per-tensor one).
    """

    strategy: str
    precision: str
    model_dtype: str
    fsdp_sharding: str = "full"
    fsdp_cpu_offload: bool = False
    fsdp_reshard: bool = True
    deepspeed: str | None = None
    zero: dict[str, Any] = field(default_factory=dict)
    foreach_adamw: bool = True

    @property
    def zero_stage(self) -> int:
        return int(self.zero.get("stage", 0))

    def describe(self) -> str:
        if self.strategy == "fsdp":
            extra = ", cpu offload" if self.fsdp_cpu_offload else ""
            return f"fsdp ({self.fsdp_sharding} sharding{extra})"
        if self.strategy == "deepspeed":
            offload = [k.split("_")[1] for k in ("offload_optimizer", "offload_param") if _offloads(self.zero, k)]
            return f"deepspeed ZeRO-{self.zero_stage} ({self.deepspeed})" + (f", {' + '.join(offload)} offloaded" if offload else "")
        return self.strategy


def _offloads(zero: dict[str, Any], key: str) -> bool:
    return str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "")


def read_zero_config(name_or_path: str) -> dict[str, Any]:
    """The ``zero_optimization`` section of a DeepSpeed config (a shipped name or a JSON file).

    Raises:
        ConfigError: not found (lists the shipped ones), not a JSON object, or an invalid stage.
    """
    from vlmkit.recipes import deepspeed_config_path

    path = deepspeed_config_path(name_or_path)
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON ({exc})") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else None
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed: {path} needs a zero_optimization object with stage 0, 1, 2 or 3")
    return zero


@dataclass(frozen=True)
class DeviceState:
    """Bytes one device holds for weights and training state under a strategy.

    Attributes:
        weights: parameters resident on the device (LoRA adapters included) and buffers.
        lora: the LoRA adapters' share of ``weights``.
        gradients: gradients kept between backward and the optimizer step.
        optimizer: optimizer states (and fp32 masters).
        buffers: persistent communication buffers (DDP's gradient buckets).
        gathered: transient memory during forward and backward (gathered parameters, unsharded
            gradients before their reduce-scatter, reduce buckets).
        step: transient memory of the optimizer step (AdamW's temporaries, fp32 gradient copies).
        grad_scale: bytes the device keeps per byte of gradient the traced micro-batch computes (1;
            1/shards when sharded; times the ratio of dtypes when the trace computes in bf16 and the
            shards are float32).
        compute_dtype: the parameters' dtype during forward and backward.
        host: bytes of host memory per process (offloaded state).
        handover: the most the device holds while the whole model is handed into or out of the
            strategy, outside the steps: FSDP allocates the whole model on every device before it shards
            it (at the start of each stage); DeepSpeed copies the model out of its engine at the end of a
            stage while its optimizer and gradient partitions are still held. 0 where the model is never
            whole beyond what the steps hold (one process, DDP).
    """

    weights: float
    lora: float
    gradients: float
    optimizer: float
    buffers: float
    gathered: float
    step: float
    grad_scale: float
    compute_dtype: str
    host: float = 0.0
    handover: float = 0.0


class ShardingModel(abc.ABC):
    """How one strategy places parameters, gradients and optimizer states on a device."""

    name: ClassVar[str]

    def compute_dtype(self, setup: Setup) -> str:
        """The parameters' dtype during forward and backward."""
        return setup.model_dtype

    def cast_to(self, setup: Setup) -> str | None:
        """The dtype the strategy casts every parameter to for forward and backward (None: each keeps its own)."""
        return None

    @abc.abstractmethod
    def state(self, stats: ParameterStats, setup: Setup, hw: Hardware) -> DeviceState:
        """Per-device bytes."""


SHARDING: Registry[ShardingModel] = Registry("distributed strategy")


def _adam_step_temporaries(stats: ParameterStats, setup: Setup, shards: int = 1) -> float:
    # foreach AdamW: one temporary per tensor of a group (sqrt of exp_avg_sq); per-tensor AdamW: two of
    # the tensor being updated (the sqrt and the division)
    if setup.foreach_adamw:
        return stats.largest_group_bytes / shards
    return 2 * stats.largest_tensor_bytes / shards


class Replicated(ShardingModel):
    """One process (or each process of DDP) holds the whole model, its gradients and AdamW states."""

    name = "none"

    def state(self, stats, setup, hw):
        return DeviceState(weights=stats.weight_bytes + stats.buffer_bytes, lora=stats.lora_bytes,
                           gradients=stats.trainable_bytes, optimizer=2 * stats.trainable_bytes, buffers=0.0, gathered=0.0,
                           step=_adam_step_temporaries(stats, setup), grad_scale=1.0, compute_dtype=setup.model_dtype)


class DistributedDataParallel(Replicated):
    """Replicated, plus DDP's gradient buckets (another copy of the trainable gradients)."""

    name = "ddp"

    def state(self, stats, setup, hw):
        base = super().state(stats, setup, hw)
        return DeviceState(**{**base.__dict__, "buffers": float(stats.trainable_bytes)})


class FullyShardedDataParallel(ShardingModel):
    """FSDP2 (see the module docstring)."""

    name = "fsdp"

    def compute_dtype(self, setup):
        return "bfloat16" if setup.precision == "bf16" else setup.model_dtype

    def cast_to(self, setup):
        return "bfloat16" if setup.precision == "bf16" else None  # MixedPrecisionPolicy(param_dtype=bf16)

    def shards(self, setup: Setup, hw: Hardware) -> int:
        return hw.gpus_per_node if setup.fsdp_sharding == "hybrid" else hw.gpus

    def state(self, stats, setup, hw):
        n = self.shards(setup, hw)
        cb = BF16 if self.compute_dtype(setup) == "bfloat16" else stats.weight_bytes / max(stats.total, 1)
        unsharded_grads = stats.largest_unit_trainable * (cb + (FP32 if setup.precision == "bf16" else 0))
        gathered = (stats.total if not setup.fsdp_reshard else 2 * stats.largest_unit) * cb + unsharded_grads
        weights, lora = stats.weight_bytes / n, stats.lora_bytes / n
        grads, optim = stats.trainable_bytes / n, 2 * stats.trainable_bytes / n
        step = _adam_step_temporaries(stats, setup, n)
        host = 0.0
        if setup.fsdp_cpu_offload:
            host, weights, lora, grads, optim, step = weights + grads + optim + step, 0.0, 0.0, 0.0, 0.0, 0.0
        traced = max(stats.trainable * cb, 1)  # the micro-batch's gradients, computed in the compute dtype
        return DeviceState(weights=weights + stats.buffer_bytes, lora=lora, gradients=grads, optimizer=optim, buffers=0.0,
                           gathered=gathered, step=step, grad_scale=stats.trainable_bytes / traced / n,
                           compute_dtype=self.compute_dtype(setup), host=host,
                           handover=float(stats.weight_bytes + stats.buffer_bytes))


class ZeroRedundancy(ShardingModel):
    """DeepSpeed ZeRO stages 0-3 (see the module docstring)."""

    name = "deepspeed"

    def compute_dtype(self, setup):
        return "bfloat16" if setup.precision == "bf16" else setup.model_dtype

    def cast_to(self, setup):
        return "bfloat16" if setup.precision == "bf16" else None  # the engine holds the module in bf16

    def state(self, stats, setup, hw):
        zero, stage, n = setup.zero, setup.zero_stage, hw.gpus
        cb = BF16 if self.compute_dtype(setup) == "bfloat16" else stats.weight_bytes / max(stats.total, 1)
        overlap = 4.5 if zero.get("overlap_comm", stage == 3) else 1.0
        buckets = [int(float(zero.get("reduce_bucket_size", 5e8)))]
        if stage <= 2:
            buckets.append(int(float(zero.get("allgather_bucket_size", 5e8))))
        bucket_bytes = overlap * cb * sum(min(b, stats.trainable) for b in buckets) if stage >= 1 else 0.0
        optimizer_host, param_host = _offloads(zero, "offload_optimizer"), _offloads(zero, "offload_param") and stage == 3
        optim = 3 * FP32 * stats.trainable / (n if stage >= 1 else 1)  # fp32 master + exp_avg + exp_avg_sq
        grads = stats.trainable * cb / (n if stage >= 2 else 1)
        step = 2 * FP32 * stats.trainable / (n if stage >= 1 else 1)  # fp32 gradient partition + AdamW temporaries
        if stage == 3:
            threshold = int(float(zero.get("stage3_param_persistence_threshold", 1e5)))
            persistent = sum(s for s in stats.sizes if s < threshold)
            weights = (stats.total - persistent) * cb / n + persistent * cb
            lora = stats.lora * cb / n
            live = int(float(zero.get("stage3_max_live_parameters", 1e9)))
            prefetch = int(float(zero.get("stage3_prefetch_bucket_size", 5e7)))
            gathered = min(live, prefetch + stats.largest_unit, stats.total - persistent) * cb
        else:
            weights, gathered, lora = stats.total * cb, 0.0, stats.lora * cb
        host = 0.0
        if optimizer_host:
            host += optim + FP32 * stats.trainable / n  # states, masters and fp32 gradients in host memory
            optim, step, grads = 0.0, 0.0, 0.0
        if param_host:
            host += weights
            weights, lora = 0.0, 0.0
        # the copy out of the engine: every tensor cloned (under ZeRO-3 while gathered), the trainable ones
        # also as fp32 from their masters, next to the optimizer and gradient partitions
        copies = stats.total * cb * (2 if stage == 3 else 1) + FP32 * stats.trainable
        return DeviceState(weights=weights + stats.buffer_bytes, lora=lora, gradients=grads, optimizer=optim, buffers=0.0,
                           gathered=gathered + bucket_bytes, step=step, grad_scale=(1 / n if stage >= 2 else 1.0),
                           compute_dtype=self.compute_dtype(setup), host=host,
                           handover=weights + stats.buffer_bytes + optim + grads + copies)


for _model in (Replicated(), DistributedDataParallel(), FullyShardedDataParallel(), ZeroRedundancy()):
    SHARDING.register(_model.name, _model)
