"""The ``deepspeed`` strategy: DeepSpeed ZeRO (stage 2: optimizer states and gradients partitioned;
stage 3: weights too), configured by a shipped JSON (``zero2``, ``zero3``, ``zero3-offload``) or
the user's.

The recipe owns the training semantics, so the config's batch, accumulation, clipping and precision
fields are filled from it (``"auto"``) and a value that contradicts the recipe is refused. The
optimizer is vlmkit's (torch AdamW with the per-part groups), handed to DeepSpeed, which owns it from
then on; checkpoints read and write it parameter by parameter through DeepSpeed's ``safe_get_full_*``
/ ``safe_set_full_*`` functions, so they are the same safetensors checkpoints as the other strategies'
(resumable on any strategy and number of processes) rather than DeepSpeed's pickled ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import torch
from torch import nn

from vlmkit import distributed as dist
from vlmkit.config import ConfigError
from vlmkit.training.materialize import has_meta, retie, take_weights_from_rank0, tie_groups
from vlmkit.training.strategies import STRATEGIES, Strategy, meta_copy

log = logging.getLogger("vlmkit")

#: config fields vlmkit fills from the recipe, with the recipe setting they come from
RECIPE_FIELDS = {
    "train_batch_size": "stages.<stage>.batch_size",
    "train_micro_batch_size_per_gpu": "stages.<stage>.micro_batch_size",
    "gradient_accumulation_steps": "batch_size / (micro_batch_size x processes)",
    "gradient_clipping": "stages.<stage>.max_grad_norm",
}


def load_config(name_or_path: str) -> dict[str, Any]:
    """The DeepSpeed config of ``train.deepspeed`` (a shipped name or a JSON file).

    Raises:
        ConfigError: not found (lists the shipped ones), not JSON, or with an ``optimizer`` /
            ``scheduler`` section (vlmkit's recipe defines both).
    """
    from vlmkit.recipes import deepspeed_config_path

    path = deepspeed_config_path(name_or_path)
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"train.deepspeed: {path} must hold a JSON object")
    for section in ("optimizer", "scheduler", "fp16"):
        if section in config:
            raise ConfigError(f"train.deepspeed: {path} has a {section!r} section; vlmkit's recipe sets the optimizer "
                              "(AdamW, stages.*.lr) and schedule (warmup + cosine) and trains in fp32 or bf16: remove it")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed: {path}: zero_optimization.stage={stage!r}; valid: 0, 1, 2, 3")
    return config


def fill_config(config: dict[str, Any], global_batch: int, micro: int, accumulation: int, max_grad_norm: float | None,
                precision: str) -> dict[str, Any]:
    """``config`` with the recipe's values in place of ``"auto"``.

    Raises:
        ConfigError: a field set to a value other than the recipe's (names both and where the recipe's comes from).
    """
    out = json.loads(json.dumps(config))
    wanted = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": accumulation, "gradient_clipping": max_grad_norm or 0.0}
    for key, value in wanted.items():
        given = out.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"train.deepspeed: {key}={given!r} contradicts the recipe's {value!r} (from {RECIPE_FIELDS[key]}); "
                              f"set it to \"auto\" or change the recipe")
        out[key] = value
    bf16 = out.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled", "auto") not in ("auto", precision == "bf16"):
        raise ConfigError(f"train.deepspeed: bf16.enabled={bf16['enabled']!r} contradicts train.precision={precision}")
    bf16["enabled"] = precision == "bf16"
    out.setdefault("zero_allow_untested_optimizer", True)  # vlmkit's torch AdamW, not DeepSpeed's own
    out.setdefault("zero_force_ds_cpu_optimizer", False)
    return out


@STRATEGIES.register("deepspeed")
class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO through ``deepspeed.initialize`` (see the module docstring)."""

    name = "deepspeed"
    description = "DeepSpeed ZeRO-2 / ZeRO-3 (train.deepspeed: zero2, zero3, zero3-offload or a JSON file)"

    @classmethod
    def check_available(cls) -> None:
        try:
            import deepspeed  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - ImportError, or DeepSpeed failing to find an accelerator
            raise ConfigError(f"train.strategy=deepspeed needs DeepSpeed ({type(exc).__name__}: {exc}); "
                              "pip install 'vlmkit[deepspeed]', or use fsdp") from None

    def prepare(self, model, groups, scheduler, micro, accumulation, max_grad_norm) -> None:
        import deepspeed

        config = load_config(self.train.deepspeed)
        config = fill_config(config, micro * accumulation * dist.world_size(), micro, accumulation, max_grad_norm, self.train.precision)
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        dist.ensure_process_group()
        if dist.any_process(has_meta(model)):  # built without weights on some process (train.rank0_loading)
            take_weights_from_rank0(model)
        self.model = model
        self._ties = tie_groups(model)
        self._skeleton = meta_copy(model)
        self._names = {id(p): n for n, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(groups([(n, p) for n, p in model.named_parameters() if p.requires_grad]))
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False)
        self.engine = self.module = engine
        self.optimizer, self.scheduler = ds_optimizer, ds_scheduler
        log.info("deepspeed: ZeRO stage %d (%s)", self.zero_stage, self.train.deepspeed)

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divides by the global token count

    def step(self, max_grad_norm: float | None) -> float | None:
        """DeepSpeed clips (``gradient_clipping``), steps the optimizer and the scheduler, and zeroes the gradients."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if max_grad_norm is None or norm is None else float(norm)

    def skip_step(self) -> None:
        self.engine.zero_grad()
        self.scheduler.step()

    def last_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # -- checkpoints: full tensors by parameter name (collective under ZeRO-3) ---------------------
    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def _ensure_optimizer_state(self) -> None:
        """Give every partition of the wrapped AdamW its state (zeros, step 0, as AdamW creates it at
        its first step) and relink DeepSpeed's per-parameter views of it. DeepSpeed (0.19) links the
        views after the first group's step only, so later groups' views are missing without this."""
        base = self.optimizer.optimizer
        for group in base.param_groups:
            for p in group["params"]:
                state = base.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
        if hasattr(self.optimizer, "_hp_optimizer_states_linked"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._ensure_optimizer_state()
        model_state: dict[str, Any] = {}
        optim_state: dict[str, Any] = {}
        for name, p in self._trainable():
            model_state[name] = safe_get_full_fp32_param(p).detach().cpu()
            values = {key: safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")}
            if all(v is not None for v in values.values()):
                optim_state[name] = {k: v.detach().cpu() for k, v in values.items()} | {"step": torch.tensor(float(self._adam_step()))}
        for name, buffer in self.engine.module.named_buffers():
            model_state[name] = buffer.detach().cpu()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return model_state, {"state": optim_state, "param_groups": groups}

    def _adam_step(self) -> int:
        for state in self.optimizer.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def load_state_dicts(self, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._ensure_optimizer_state()
        states = optim_state.get("state", {})
        step = None
        for name, p in self._trainable():
            if name in model_state:
                safe_set_full_fp32_param(p, model_state[name].float())
            for key in ("exp_avg", "exp_avg_sq"):
                if name in states and key in states[name]:
                    safe_set_full_optimizer_state(p, states[name][key].float(), key)
            if name in states and "step" in states[name]:
                step = states[name]["step"]
        if step is not None:
            for state in self.optimizer.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.as_tensor(step, dtype=state["step"].dtype) if torch.is_tensor(state["step"]) else int(step)
        with torch.no_grad():
            for name, buffer in self.engine.module.named_buffers():
                if name in model_state:
                    buffer.copy_(model_state[name])
        for group, saved in zip(self.optimizer.param_groups, optim_state.get("param_groups", [])):
            group.update({k: v for k, v in saved.items() if k in ("lr", "initial_lr")})

    def unwrap(self) -> nn.Module:
        """The trained weights gathered on every process into a plain copy of the model (trainable
        parameters from DeepSpeed's fp32 masters, the rest gathered from the engine's module)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        full: dict[str, torch.Tensor] = {}
        trainable = dict(self._trainable())
        params = list(module.parameters())
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.zero_stage == 3 else contextlib.nullcontext()
        with gather:
            for name, tensor in module.state_dict().items():
                full[name] = tensor.detach().clone()
        for name, p in trainable.items():
            full[name] = safe_get_full_fp32_param(p).detach().clone()
        reference = self._skeleton.state_dict()
        full = {k: v.to(reference[k].dtype) if k in reference else v for k, v in full.items()}
        plain = self._skeleton
        plain.load_state_dict(full, assign=True)
        retie(plain, self._ties)
        self.engine = self.module = self.model = None
        return plain
