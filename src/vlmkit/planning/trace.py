"""What one micro-batch's forward and backward allocate, found by running them on fake tensors.

The stage's meta-device model (see :mod:`.skeleton`) gets fake parameters (``FakeTensorMode``: shapes,
dtypes and autograd, no data, no memory) and runs the trainer's path on a fake micro-batch: vision
tower, connector, fusion (the prefix splice, or the gated cross-attention blocks with their visual
context), language model and the loss of its kind (:mod:`.losses`: decoder-only, encoder-decoder,
encoder-only), then ``backward()``. A dispatch mode records every storage the operators create and
frees it when autograd and Python drop it, so the result is what autograd actually keeps for this
architecture, trainability and attention implementation: for a trainable Llama layer on SDPA that is
the norm inputs and outputs, q/k/v after RoPE, the attention output with its log-sum-exp, the residual
sum and the four MLP intermediates (8·B·T·H + 4·B·T·I elements in the compute dtype); for a frozen
layer that gradients cross, only what input gradients need (norm inputs, q/k/v, the attention output,
three MLP intermediates; no linear-layer inputs); nothing for a frozen tower with nothing trainable
before it; attention scores only when the model runs eager attention. A decoder-only LM head's logits exist only at the labelled positions, with
their float32 log-softmax; an encoder-decoder's at every answer position of the decoder.

With gradient checkpointing the model's checkpointing is switched on as the trainer does (non-reentrant,
per transformer layer), so what is kept is each layer's input, and the recomputation of one layer at a
time shows up in the backward; the trainer also checkpoints the frozen (eval-mode) layers that the
connector's gradients cross (:func:`vlmkit.training.trainer.enable_gradient_checkpointing`). The gated
cross-attention blocks run as forward pre-hooks of the language model's layers, outside what is
checkpointed (a layer's ``forward``), so they keep their activations with checkpointing on, and the
trace shows that too.

Checked against measured CPU memory by ``bench/plan_memory.py`` (decoder-only with prefix and with
cross-attention fusion, and a Flan-T5 encoder-decoder; with and without checkpointing). The trace takes
a few seconds for a 7B model (its cost is per operator, not per byte).

FLOPs are counted on the same run with the formulas of :mod:`torch.utils.flop_counter`: the matmuls and
convolutions of the forward (2·parameters·tokens for every layer on the path, plus attention), and the
backward, which computes weight gradients only where parameters train and input gradients only down
to the first part that needs them, plus the recomputed forward under checkpointing.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class MicroBatch:
    """The shape of one forward pass on one device.

    Attributes:
        rows: samples in the micro-batch.
        seq_len: tokens per row, visual tokens included (the batch is padded to this length).
        images_per_row: images per sample.
        labelled: positions of the micro-batch that carry a label (the LM head runs on these only).
        param_dtype: dtype every parameter is cast to for the computation (``bfloat16`` under FSDP's
            mixed precision or DeepSpeed's bf16); None keeps each parameter's own dtype.
        autocast: bf16 autocast around the forward (``train.precision: bf16``).
        checkpointing: activation checkpointing of the vision tower and language model layers.
        answer_len: decoder tokens per row (encoder-decoder language models; ``seq_len`` is then the
            encoder's input).
    """

    rows: int
    seq_len: int
    images_per_row: int
    labelled: int
    param_dtype: str | None
    autocast: bool
    checkpointing: bool
    answer_len: int = 0


@dataclass
class MicroBatchTrace:
    """Bytes and FLOPs of one micro-batch's forward + backward (weights and optimizer not included).

    Attributes:
        stored: bytes alive when the forward has returned the loss: what autograd keeps for backward.
        activation_timeline / grad_timeline: at every allocation of the run, the bytes held by
            activations and temporaries, and by parameter gradients (which strategies shard).
        grads: bytes of all parameter gradients at the end (in ``param_dtype``).
        largest_grad: bytes of the largest single gradient.
        forward_flops / backward_flops: FLOPs of the pass (backward includes any recomputation).
    """

    stored: int
    activation_timeline: list[int] = field(repr=False)
    grad_timeline: list[int] = field(repr=False)
    grads: int
    largest_grad: int
    forward_flops: int
    backward_flops: int

    def peak(self, grad_scale: float = 1.0, accumulated_grads: float | None = None) -> float:
        """Most bytes held at once during forward + backward, gradients counted at ``grad_scale`` of
        their size (a sharded strategy keeps ``1/shards`` of them). ``accumulated_grads``: bytes of
        gradients already held from earlier micro-batches of the step (accumulation), which the new
        gradients are added into."""
        if accumulated_grads is not None:
            return max(self.activation_timeline, default=0) + accumulated_grads + grad_scale * self.largest_grad
        return max((a + grad_scale * g for a, g in zip(self.activation_timeline, self.grad_timeline)), default=0.0)


class _Recorder(TorchDispatchMode):
    """Counts the bytes of the storages operators create while they are alive, and the FLOPs of the
    operators :mod:`torch.utils.flop_counter` has formulas for. Storages that become parameter
    gradients (:meth:`mark_grad`) are counted apart. ``existing``: tensors made before (weights,
    inputs), whose views are no new memory.

    (``FlopCounterMode`` itself is not used: its module tracker holds on to the tensors a checkpointed
    layer recomputes, which would make checkpointing look useless.)
    """

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, Any] = {}
        self.grad_keys: set[int] = set()
        self.activations = 0
        self.grads = 0
        self.activation_timeline: list[int] = []
        self.grad_timeline: list[int] = []
        self.flops = 0
        self.formulas = _flop_formulas()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.sizes or key in self.existing:  # a view, or an in-place result
            return
        size = storage.nbytes()
        self.sizes[key] = size
        self.refs[key] = weakref.ref(storage, partial(self._free, key))
        self.activations += size
        self.activation_timeline.append(self.activations)
        self.grad_timeline.append(self.grads)

    def _free(self, key: int, _ref: Any) -> None:
        size = self.sizes.pop(key, 0)
        self.refs.pop(key, None)
        if key in self.grad_keys:
            self.grad_keys.discard(key)
            self.grads -= size
        else:
            self.activations -= size

    def mark_grad(self, param: torch.Tensor) -> None:
        key = param.grad.untyped_storage()._cdata
        if key in self.sizes and key not in self.grad_keys:
            self.grad_keys.add(key)
            self.activations -= self.sizes[key]
            self.grads += self.sizes[key]


def _flop_formulas() -> dict[Any, Any]:
    """``torch.utils.flop_counter``'s formulas by operator, plus the CPU flash-attention kernels SDPA
    picks on (fake) CPU tensors, counted like the GPU ones (causal masking not discounted)."""
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_val=None, **kwargs):
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    def backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

    aten = torch.ops.aten
    return {**flop_registry, aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def _fake_parameters(model: nn.Module, mode: Any, dtype: torch.dtype | None) -> None:
    """Replace every parameter and buffer of the meta-device ``model`` by a fake CPU tensor of the same
    shape (floating ones in ``dtype`` when given), keeping ``requires_grad`` and weight tying."""
    convert = mode.fake_tensor_converter
    memo: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            meta = t if t.device.type == "meta" else t.to("meta")
            if dtype is not None and meta.is_floating_point():
                meta = meta.to(dtype)
            out = convert.from_meta_and_device(mode, meta, "cpu")
            memo[id(t)] = nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out
        return memo[id(t)]

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = fake(p)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake(b)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing exactly as the trainer switches it on (frozen parts included)."""
    from vlmkit.training.trainer import enable_gradient_checkpointing

    enable_gradient_checkpointing(model)


def trace_micro_batch(model: nn.Module, batch: MicroBatch) -> MicroBatchTrace:
    """Run one training micro-batch of ``model`` (a meta-device model with a policy applied; not
    modified) on fake tensors and measure what it allocates.

    Raises:
        ValueError: the sequence cannot hold the micro-batch's visual tokens.
        RegistryError: a language-model kind without a loss entry in :data:`~.losses.KIND_LOSSES`.
        RuntimeError: an operator of the model has no fake (meta) implementation.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vlmkit.planning.losses import KIND_LOSSES

    visual = batch.images_per_row * model.num_image_tokens
    if visual >= batch.seq_len:
        raise ValueError(f"a sequence of {batch.seq_len} tokens cannot hold {batch.images_per_row} image(s) x "
                         f"{model.num_image_tokens} visual tokens and any text; use a longer sequence (--seq-len)")
    kind = KIND_LOSSES.get(model.language.spec.kind)
    model = copy.deepcopy(model)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    _fake_parameters(model, mode, DTYPES[batch.param_dtype] if batch.param_dtype else None)
    if batch.checkpointing:
        enable_checkpointing(model)
    size, images = model.vision.image_size, batch.rows * batch.images_per_row
    hooks: list[Any] = []
    # the images per row stay a real tensor: a fusion reads them as numbers (cross-attention lays out
    # each row's visual context by them), which a fake tensor cannot give
    counts = torch.full((batch.rows,), batch.images_per_row, dtype=torch.long)
    try:
        with mode:
            ids = torch.zeros(batch.rows, batch.seq_len, dtype=torch.long)
            is_image = torch.zeros(batch.rows, batch.seq_len, dtype=torch.bool)
            pixels = torch.empty(images, 3, size, size, dtype=model.vision.dtype) if images else None
            targets = kind.targets(batch)
            inputs = [t for t in (ids, is_image, counts, pixels, targets) if t is not None]
            recorder = _Recorder([*model.parameters(), *model.buffers(), *inputs])
            hooks = [p.register_post_accumulate_grad_hook(recorder.mark_grad) for p in model.parameters() if p.requires_grad]
            with recorder:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=batch.autocast):
                    loss = _loss(model, kind, ids, is_image, pixels, counts, targets)
                stored, forward_flops = recorder.activations, recorder.flops
                loss.backward()
                del loss
    finally:
        for hook in hooks:
            hook.remove()
    grads = [p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None]
    return MicroBatchTrace(stored=stored, activation_timeline=recorder.activation_timeline,
                           grad_timeline=recorder.grad_timeline, grads=sum(grads), largest_grad=max(grads, default=0),
                           forward_flops=forward_flops, backward_flops=recorder.flops - forward_flops)


def _loss(model: nn.Module, kind: Any, ids: torch.Tensor, is_image: torch.Tensor, pixels: torch.Tensor | None,
          counts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed training loss on fake inputs, as :meth:`VisionLanguageModel.forward` computes it: the
    fused embeddings (held until the loss returns, as the model's forward holds them), then the loss
    of the language model's kind (``kind``, a :class:`~vlmkit.planning.losses.KindLoss`)."""
    embeds, extra = _fuse(model, ids, is_image, pixels, counts)
    return kind.loss(model.language, embeds, extra, targets)


def _fuse(model: nn.Module, ids: torch.Tensor, is_image: torch.Tensor, pixels: torch.Tensor | None,
          counts: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Images through tower and connector, then the fusion, as :meth:`VisionLanguageModel.prepare`
    (the connector's output is dropped once fused)."""
    features = model.encode_images(pixels) if pixels is not None else None
    return model.fusion.embed(model.language, ids, is_image, features, counts)
