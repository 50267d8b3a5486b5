"""Measured peak memory of training steps on the CPU, to hold the planner's estimates against.

The measurement is PyTorch's own allocator accounting: ``torch.profiler`` with ``profile_memory=True``
records every allocation and free of the CPU allocator (tensors, and the buffers kernels allocate
inside), in order; their running sum is the memory PyTorch holds above what existed when profiling
began, and its maximum is the peak. What existed before (weights, the batch, optimizer states of
earlier steps) is added from the tensors themselves.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class MeasuredPeak:
    """Bytes, measured. ``before``: tensors alive when the measured steps began; ``peak``: ``before`` +
    the largest amount allocated above it while the steps ran; ``end``: ``before`` + what was still
    allocated when they ended."""

    before: int
    peak: int
    end: int


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages of ``tensors`` (an iterable; views and ties counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def profile_peak(run: Callable[[], None], alive_before: int) -> MeasuredPeak:
    """Run ``run()`` under the profiler and return its peak (see the module docstring)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    current = highest = 0
    for _, size in sorted(events):
        current += size
        highest = max(highest, current)
    return MeasuredPeak(before=alive_before, peak=alive_before + highest, end=alive_before + current)


def _longest(fits: Callable[[int], Any], limit: int) -> tuple[int, Any]:
    """The largest ``n`` in ``[0, limit]`` with ``fits(n)`` not None (``fits`` is monotone), and that result."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) is not None else (low, middle - 1)
    return low, fits(low)


def _decoder_sample(encode, words, rows_rng, processor, seq_len, answer_len):
    # "<image>" and a caption that fills the sequence
    n, sample = _longest(lambda k: encode(0, " ".join(words[:k]), lambda e: e.input_ids.numel() <= seq_len), seq_len)
    return sample if n else None


def _seq2seq_sample(encode, words, rng, processor, seq_len, answer_len):
    # a caption of answer_len tokens for the decoder, and a prompt that fills the encoder's sequence
    n, _ = _longest(lambda k: encode(0, " ".join(words[:k]), lambda e: e.labels.numel() <= answer_len), answer_len)
    caption = " ".join(words[:n])
    _, sample = _longest(lambda k: encode(k, caption, lambda e: e.input_ids.numel() <= seq_len), seq_len)
    return sample if n else None


def _encoder_sample(encode, words, rng, processor, seq_len, answer_len):
    # a VQA row: a prompt that fills the sequence, one of the model's answers
    answer = rng.choice(processor.answers)
    _, sample = _longest(lambda k: encode(k, answer, lambda e: e.input_ids.numel() <= seq_len), seq_len)
    return sample


#: per processor layout (the language model's kind): one sample of the asked shape
_SAMPLES = {"decoder": _decoder_sample, "encoder-decoder": _seq2seq_sample, "encoder": _encoder_sample}


def caption_batch(processor: Any, rows: int, seq_len: int, seed: int = 0, answer_len: int = 16) -> dict[str, torch.Tensor]:
    """A collated training batch of ``rows`` one-image samples of one shape, in the processor's layout,
    random words from the tokenizer's vocabulary filling the text:

    * ``decoder``: ``<image>`` and a caption, every row exactly ``seq_len`` tokens long;
    * ``encoder-decoder``: ``<image>`` and a prompt filling the encoder's ``seq_len`` tokens, a caption
      of ``answer_len`` tokens for the decoder (``labels`` ``(rows, answer_len)``);
    * ``encoder``: ``<image>`` and a prompt filling ``seq_len`` tokens, one of the model's answers (a VQA row).

    Raises:
        ValueError: no text fits next to the model's visual tokens.
    """
    from PIL import Image

    from vlmkit.processing.processor import EncodingError
    from vlmkit.processing.templates import Message

    rng = random.Random(seed)
    vocab = [t for t in processor.tokenizer.get_vocab() if t.isalpha() and len(t) > 2]
    samples = []
    for _ in range(rows):
        image = Image.new("RGB", (processor.image_transform.size,) * 2, tuple(rng.randrange(256) for _ in range(3)))
        words = [rng.choice(vocab) for _ in range(2 * seq_len + answer_len)]

        def encode(prompt_words: int, reply: str, fits: Callable[[Any], bool]) -> Any:
            prompt = " ".join(["<image>", *words[len(words) - prompt_words:]]) if prompt_words else "<image>"
            try:
                encoded = processor.encode([Message("user", prompt), Message("assistant", reply)], [image])
            except EncodingError:
                return None
            return encoded if fits(encoded) else None

        sample = _SAMPLES[processor.layout](encode, words, rng, processor, seq_len, answer_len)
        if sample is None:
            raise ValueError(f"no text fits in {seq_len} tokens next to this model's visual tokens")
        samples.append(sample)
    batch = processor.collate(samples)
    widths = {"input_ids": (seq_len, processor.tokenizer.pad_token_id), "attention_mask": (seq_len, 0)}
    if batch["labels"].dim() == 2:  # token labels: aligned with the ids (decoder) or the answer (encoder-decoder)
        widths["labels"] = (seq_len if processor.layout == "decoder" else answer_len, -100)
    for key, (width, value) in widths.items():  # pad every row to the asked shape
        if batch[key].shape[1] < width:
            batch[key] = nn.functional.pad(batch[key], (0, width - batch[key].shape[1]), value=value)
    return batch


@dataclass(frozen=True)
class StageMeasurement:
    """One stage of a recipe trained for a few steps on the CPU (fp32, one process), measured.

    Attributes:
        parameters / trainable: of the real model.
        rows / seq_len / labelled: the micro-batch (= the step's batch); ``labelled`` counts the targets
            the loss sums over (label positions, answer tokens, or rows of an encoder-only model).
        visual_tokens: placeholders per sample in the sequence (one image each).
        answer_len: decoder tokens per sample of an encoder-decoder model, else 0.
        kind: the language model's kind (decoder, encoder-decoder, encoder).
        weights / gradients / optimizer: bytes of those tensors (gradients after a backward).
        stored: bytes allocated by the forward and still held when it returns (activations kept for backward).
        peak: the profiler's peak over the steps (see :func:`profile_peak`), weights and batch included.
    """

    parameters: int
    trainable: int
    rows: int
    seq_len: int
    labelled: int
    visual_tokens: int
    weights: int
    gradients: int
    optimizer: int
    stored: int
    peak: int
    answer_len: int = 0
    kind: str = "decoder"


def measure_stage(recipe: str, overrides: list[str], stage_name: str, rows: int, seq_len: int, steps: int = 3,
                  seed: int = 0, answer_len: int = 16) -> StageMeasurement:
    """Build ``recipe``'s model for real (random weights, a BPE tokenizer trained on a small corpus),
    apply stage ``stage_name``'s policy (and activation checkpointing when the recipe asks for it), and
    train ``steps`` AdamW steps of one ``rows`` x ``seq_len`` batch (:func:`caption_batch`; ``answer_len``
    decoder tokens for an encoder-decoder model): ``model(**batch).loss.backward()``, ``step()``,
    ``zero_grad(set_to_none=True)``, as the trainer does on one process.

    Raises:
        ConfigError: a bad recipe, override or stage name.
    """
    from vlmkit.config import load_recipe
    from vlmkit.models.build import build_model
    from vlmkit.models.vlm import TARGET_KEYS
    from vlmkit.planning.trace import enable_checkpointing
    from vlmkit.processing.tokenizer import train_bpe_tokenizer
    from vlmkit.training.policy import apply_policy

    torch.manual_seed(seed)
    config = load_recipe(recipe, overrides)
    stage = config.stage(stage_name)
    size = config.model.language.tokenizer.train_vocab_size or 512
    corpus = [f"word{i} shape{i % 97} colour{i % 89} blue circle" for i in range(4 * size)]
    model, processor = build_model(config.model, tokenizer_texts=corpus) if config.model.language.tokenizer.train_vocab_size else \
        build_model(config.model, tokenizer=train_bpe_tokenizer(corpus, size))
    apply_policy(model, stage.policy, stage.lora)
    if config.train.gradient_checkpointing:
        enable_checkpointing(model)
    batch = caption_batch(processor, rows, seq_len, seed, answer_len)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_counts", *TARGET_KEYS) if k in batch}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def forward() -> torch.Tensor:
        return model(**inputs).loss

    def step() -> None:
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = tensor_bytes([*model.parameters(), *model.buffers(), *batch.values()])
    holder: list[torch.Tensor] = []
    stored = profile_peak(lambda: holder.append(forward()), 0)  # the forward alone, its loss (and graph) kept
    del holder[:]
    peak = profile_peak(lambda: [step() for _ in range(steps)], before)
    forward().backward()
    gradients = tensor_bytes(p.grad for p in params)
    optimizer.zero_grad(set_to_none=True)
    return StageMeasurement(
        parameters=sum(p.numel() for p in model.parameters()), trainable=sum(p.numel() for p in params), rows=rows,
        seq_len=int(batch["input_ids"].shape[1]), labelled=model.count_targets(batch),
        visual_tokens=model.num_image_tokens, weights=tensor_bytes(model.parameters()), gradients=gradients,
        optimizer=tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()),
        stored=stored.end, peak=peak.peak,
        answer_len=int(batch["labels"].shape[1]) if processor.layout == "encoder-decoder" else 0, kind=processor.layout)
