"""One device's peak memory in a training step: the strategy's state plus the traced micro-batch.

A step holds the weights, the optimizer states (from the first step on) and the batch throughout; on
top of that, at different times:

* forward + backward of each micro-batch: the activations and temporaries the trace recorded, with
  the gradients appearing as backward computes them (at the strategy's share; with accumulation the
  gradients of earlier micro-batches are held throughout), plus the strategy's gathered parameters
  and buckets;
* the optimizer step: the gradients and the step's temporaries.

Outside the steps, a strategy may hold the whole model while it is handed in or out (FSDP before it
shards, DeepSpeed when it copies the model out of its engine: :attr:`DeviceState.handover`).

The peak is the largest of these phases. CUDA's own context (~0.5-1 GB) and allocator fragmentation
are not included.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmkit.planning.parameters import ParameterStats
from vlmkit.planning.sharding import SHARDING, DeviceState, Hardware, Setup
from vlmkit.planning.trace import MicroBatchTrace


#: the phase name of a peak that falls outside the steps, when the strategy holds the whole model
HANDOVER = "hand-over of the whole model (FSDP before sharding; DeepSpeed's copy out of its engine)"


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes on one device; :attr:`peak` is the estimate, the other fields what it is made of.

    Attributes:
        state: weights, gradients, optimizer states and buffers under the strategy.
        batch: the micro-batch's input tensors (ids, mask, labels, pixels).
        stored: activations kept for backward at the end of the forward.
        forward_backward: the most held by one micro-batch's forward + backward (activations,
            temporaries and new gradients at the strategy's share), gathered parameters included.
        peak: weights + optimizer + buffers + batch + the larger of ``forward_backward`` and the
            optimizer step (gradients + its temporaries).
        phase: where the peak falls (``backward``, ``optimizer step`` or :data:`HANDOVER`).
    """

    state: DeviceState
    batch: float
    stored: float
    forward_backward: float
    peak: float
    phase: str

    def free(self, hw: Hardware) -> float:
        return hw.gpu_memory - self.peak

    def fits(self, hw: Hardware) -> bool:
        return self.peak <= hw.gpu_memory


def batch_bytes(rows: int, seq_len: int, images: int, image_size: int, target_elements: int | None = None) -> int:
    """The collated micro-batch on the device: int64 ids and mask ``(rows, seq_len)``, int64 targets
    (``target_elements``; default: labels aligned with the ids, as decoder-only models take them), the
    images per row and float32 pixels."""
    targets = rows * seq_len if target_elements is None else target_elements
    return 2 * 8 * rows * seq_len + 8 * targets + 8 * rows + 4 * images * 3 * image_size * image_size


def device_memory(stats: ParameterStats, setup: Setup, hw: Hardware, trace: MicroBatchTrace, accumulation: int,
                  batch: int) -> DeviceMemory:
    """The peak estimate of one device (see the module docstring).

    Raises:
        RegistryError: an unknown strategy.
    """
    state = SHARDING.get(setup.strategy).state(stats, setup, hw)
    accumulated = trace.grads * state.grad_scale if accumulation > 1 else None
    forward_backward = trace.peak(state.grad_scale, accumulated) + state.gathered
    step = state.gradients + state.step
    resident = state.weights + state.optimizer + state.buffers + batch
    phase = "backward" if forward_backward >= step else "optimizer step"
    peak = resident + max(forward_backward, step)
    if state.handover > peak:
        phase, peak = HANDOVER, state.handover
    return DeviceMemory(state=state, batch=batch, stored=trace.stored, forward_backward=forward_backward,
                        peak=peak, phase=phase)


def scaled_trace(trace: MicroBatchTrace, factor: float) -> MicroBatchTrace:
    """``trace`` with its activations scaled by ``factor``: a micro-batch of ``factor`` times the rows
    (activations grow with the rows; gradients do not). An approximation for advice."""
    return MicroBatchTrace(
        stored=int(trace.stored * factor), activation_timeline=[int(a * factor) for a in trace.activation_timeline],
        grad_timeline=trace.grad_timeline, grads=trace.grads, largest_grad=trace.largest_grad,
        forward_flops=int(trace.forward_flops * factor), backward_flops=int(trace.backward_flops * factor))
