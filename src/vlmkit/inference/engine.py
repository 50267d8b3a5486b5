"""The generation engine: continuous batching over one model.

Requests of different lengths, images and settings share decode steps. Each :meth:`Engine.step`

1. drops cancelled requests,
2. admits waiting requests up to ``max_batch_size`` and prefills them together (one left-padded
   forward over their embedded prompts, images fused in),
3. runs one decode step for every request already running (one token each),
4. merges the new requests into the running batch and retires the finished ones,

so a long answer never holds back short ones and a new request starts at the next step.

**KV cache.** The running batch keeps one transformers :class:`~transformers.DynamicCache`,
left-padded to the longest row, with a ``(B, L)`` attention mask and per-row position ids (exactly
what transformers' ``generate`` computes for a left-padded batch, so a request's greedy tokens are
the same alone or batched). Joining pads the shorter side on the left and concatenates along the
batch; leaving selects rows and trims columns that are padding in every remaining row.
transformers' own continuous-batching manager (paged cache) takes token ids, not the image-fused
prompt embeddings vlmkit prefills with, so it is not used.

**Cross-attention models** get their visual context (:class:`~vlmkit.models.fusion.MediaContext`)
per request; its projected image keys/values are computed once at prefill and reused by every step.

Encoder-decoder backbones (Flan-T5) run admitted requests as a static group through transformers'
``generate`` (no joining mid-generation); encoder-only backbones do not generate (classification).

Sampling uses one ``torch.Generator`` per request (seeded from its ``seed``, else drawn from the
OS), never the global RNG.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from vlmkit.models.fusion import MEDIA_KWARG, MediaContext
from vlmkit.processing.processor import Encoded

FINISH_REASONS = ("stop", "length", "cancelled", "error")
log = logging.getLogger("vlmkit.engine")


class PromptTooLongError(ValueError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""


class QueueFullError(RuntimeError):
    """The engine holds as many requests as it was allowed to queue."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    ``temperature`` 0 is greedy; otherwise tokens are sampled after temperature, ``top_k`` (0 = off)
    and ``top_p`` (1 = off) filtering, with the request's own generator (``seed``: reproducible).
    ``stop``: strings that end the answer (not included in it).

    Raises:
        ValueError: a field is out of range (the message names it).
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_settings(cls, settings: Any) -> "SamplingParams":
        """From :class:`~vlmkit.inference.pipeline.GenerationSettings` (``do_sample`` False = greedy)."""
        return cls(
            max_tokens=settings.max_new_tokens,
            temperature=float(settings.temperature) if settings.do_sample else 0.0,
            top_p=settings.top_p,
            top_k=settings.top_k,
            seed=settings.seed,
        )


@dataclass(frozen=True)
class Completion:
    """A finished request: the answer text (stop strings cut, special tokens dropped, stripped), its
    token ids, why it ended (``stop``, ``length``, ``cancelled``, or ``error`` when the step that
    ran it failed) and token counts (the prompt's
    include the image tokens)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StreamDelta:
    """New answer text since the previous delta; the last delta of a request has ``finish_reason``."""

    text: str
    finish_reason: str | None = None


# ---------------------------------------------------------------------------------------------
def finish_ids(processor: Any, ids: Sequence[int], stops: Sequence[str] = ()) -> tuple[list[int], bool]:
    """The answer's ids: cut before the first stop token, then before the first stop string
    (the template's and ``stops``) found in the decoded text. Returns ``(ids, stopped)``.
    """
    stop_ids = set(processor.stop_token_ids())
    kept: list[int] = []
    stopped = False
    for t in ids:
        if t in stop_ids:
            stopped = True
            break
        kept.append(int(t))
    tok = processor.tokenizer
    text = tok.decode(kept)
    cuts = [text.index(s) for s in (*processor.stop_strings(), *stops) if s and s in text]
    if cuts:
        return tok(text[: min(cuts)], add_special_tokens=False)["input_ids"], True
    return kept, stopped


@dataclass(eq=False)
class Request:
    """One request inside the engine (created by :meth:`Engine.add`)."""

    id: int
    input_ids: torch.Tensor  # (T,)
    pixel_values: torch.Tensor | None  # (num_images, 3, S, S)
    params: SamplingParams
    sink: Callable[["Request", StreamDelta], None] | None = None
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    finish_reason: str | None = None
    completion: Completion | None = None
    cancelled: bool = False
    media: MediaContext | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Continuous-batching generation for one vision-language model and its processor.

    Args:
        model: the model (put in eval mode).
        processor: its processor (stop tokens, template stop strings, decoding).
        max_batch_size: most requests decoded together.

    Not thread-safe by itself except :meth:`add` / :meth:`cancel`; :class:`EngineThread` drives it
    from one thread for servers. Raises :class:`~vlmkit.models.language.base.NotGenerativeError`
    for encoder-only backbones.
    """

    def __init__(self, model: Any, processor: Any, max_batch_size: int = 32):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.max_batch_size = int(max_batch_size)
        self.kind = model.language.spec.kind
        if self.kind == "encoder":
            raise model.language.not_generative()
        self.device = next(model.parameters()).device
        self.stop_ids = set(processor.stop_token_ids())
        self.template_stops = tuple(s for s in processor.stop_strings() if s)
        config = model.language.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.context_length = int(positions) if positions else int(processor.max_length)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._rows: list[Request] = []
        self._admitting: list[Request] = []  # popped from the queue, not yet in the batch
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L) long
        self._pos: torch.Tensor | None = None  # (B,) next position id
        self._last: torch.Tensor | None = None  # (B,) last sampled token
        self._media: MediaContext | None = None

    # -- requests -------------------------------------------------------------------------------
    def add(
        self, encoded: Encoded, params: SamplingParams | None = None,
        sink: Callable[[Request, StreamDelta], None] | None = None, strict: bool = False,
    ) -> Request:
        """Queue one encoded prompt (``processor.prompt(...)``); ``sink(request, delta)`` receives
        its text deltas as they are decoded (called from the thread that runs :meth:`step`).

        A generation that reaches :attr:`context_length` ends there (``length``); ``strict``
        refuses up front a request whose ``max_tokens`` would not fit (the OpenAI API's rule).

        Raises:
            PromptTooLongError: the prompt leaves no room for a token, or (``strict``) prompt tokens +
                ``max_tokens`` exceed :attr:`context_length`.
        """
        params = params or SamplingParams()
        n = int(encoded.input_ids.numel())
        if n >= self.context_length:
            raise PromptTooLongError(
                f"the prompt has {n} tokens (image tokens included): no room left in the model's context of "
                f"{self.context_length} tokens"
            )
        if strict and n + params.max_tokens > self.context_length:
            raise PromptTooLongError(
                f"the prompt has {n} tokens (image tokens included) and max_tokens is {params.max_tokens}: "
                f"{n + params.max_tokens} > the model's context of {self.context_length} tokens"
            )
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        pixels = encoded.pixel_values if encoded.pixel_values.numel() else None
        req = Request(next(self._ids), encoded.input_ids.long(), pixels, params, sink, generator)
        with self._lock:
            self._waiting.append(req)
        return req

    def cancel(self, request: Request) -> None:
        """Stop a request at the next step (its last delta has ``finish_reason='cancelled'``)."""
        request.cancelled = True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Unfinished requests in the batch or being admitted into it."""
        return sum(not r.finished for r in (*self._rows, *self._admitting))

    def has_work(self) -> bool:
        return bool(self._waiting or self._rows)

    def abort_all(self, reason: str = "cancelled") -> list[Request]:
        """End every waiting, admitted and running request (their last delta says ``reason``) and
        reset the batch; used after a failed step so that one failure ends only its requests."""
        with self._lock:
            reqs = [*self._waiting, *self._admitting, *self._rows]
            self._waiting.clear()
            self._admitting = []
        self._rows, self._cache, self._mask, self._pos, self._last, self._media = [], None, None, None, None, None
        done: list[Request] = []
        for r in reqs:
            if not r.finished:
                try:
                    self._finish(r, reason, done)
                except Exception:  # noqa: BLE001 - the request still has to end
                    r.finish_reason = reason
                    r.completion = Completion(r.emitted, tuple(r.output_ids), reason, r.prompt_tokens, len(r.output_ids))
                    self._emit(r, StreamDelta("", reason))
        return done

    # -- the loop ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One scheduling step (see the module doc). Returns the requests that finished in it."""
        done: list[Request] = []
        with self._lock:
            for req in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(req)
                self._finish(req, "cancelled", done)
            room = self.max_batch_size - len(self._rows)
            new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            self._admitting = new
        for req in self._rows:
            if req.cancelled:
                self._finish(req, "cancelled", done)
        self._retire()
        if self.kind == "encoder-decoder":
            if new:
                self._run_static(new, done)
            self._admitting = []
            return done
        if self._rows:
            self._decode(done)
        if new:
            self._prefill(new, done)
        self._admitting = []
        self._retire()
        return done

    def run(self) -> None:
        """Step until no request is waiting or running."""
        while self.has_work():
            self.step()

    def generate(
        self, prompts: Sequence[Encoded], params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_cache: bool = True,
    ) -> list[Completion]:
        """Answer ``prompts`` (continuous batching, ``max_batch_size`` at a time); completions in order.

        ``use_cache=False`` is the reference path: one request at a time, the whole sequence
        recomputed for every token (no KV cache, no batching, no padding).
        """
        each = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(each)} sampling settings")
        if not use_cache:
            return [self._generate_uncached(p, s) for p, s in zip(prompts, each)]
        reqs = [self.add(p, s) for p, s in zip(prompts, each)]
        while not all(r.finished for r in reqs):
            self.step()
        return [r.completion for r in reqs]

    @torch.inference_mode()
    def _generate_uncached(self, encoded: Encoded, params: SamplingParams | None) -> Completion:
        req = self.add(encoded, params)
        with self._lock:
            self._waiting.remove(req)
        done: list[Request] = []
        pixels = None if req.pixel_values is None else req.pixel_values.to(self.device, self.model.language.dtype)
        counts = torch.tensor([0 if pixels is None else pixels.shape[0]], device=self.device)
        if self.kind == "encoder-decoder":
            self._run_static([req], done)
            return req.completion
        while not req.finished:
            ids = torch.cat([req.input_ids, torch.tensor(req.output_ids, dtype=torch.long)])[None].to(self.device)
            embeds, extra = self.model.prepare(ids, pixels, counts)
            logits = self.model.language.logits(embeds, None, **extra)[:, -1].float()
            self._accept(req, int(self._sample([req], logits)[0]), done)
        return req.completion

    # -- decoder-only internals ---------------------------------------------------------------
    def _forward(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                 extra: dict[str, Any]) -> torch.Tensor:
        """Last-position logits ``(B, V)`` (float32); ``cache`` is extended in place."""
        out = self.model.language.hf_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
            use_cache=True, logits_to_keep=1, **extra,
        )
        return out.logits[:, -1].float()

    def _left_padded(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``(B, T)`` left-padded to the longest prompt, the
        images ``(sum(counts), 3, S, S)`` in row order (``None`` without any) and ``counts`` ``(B,)``,
        on the model's device."""
        length = max(r.prompt_tokens for r in reqs)
        pad = self.processor.pad_token_id if self.processor.pad_token_id is not None else 0
        ids = torch.full((len(reqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), length), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, length - r.prompt_tokens:] = r.input_ids
            mask[i, length - r.prompt_tokens:] = 1
        pixels = [r.pixel_values for r in reqs if r.pixel_values is not None]
        counts = torch.tensor([0 if r.pixel_values is None else r.pixel_values.shape[0] for r in reqs])
        pixel_values = torch.cat(pixels).to(self.device, self.model.language.dtype) if pixels else None
        return ids.to(self.device), mask.to(self.device), pixel_values, counts.to(self.device)

    def _prefill(self, new: list[Request], done: list[Request]) -> None:
        ids, mask, pixel_values, counts = self._left_padded(new)
        embeds, extra = self.model.prepare(ids, pixel_values, counts)
        media = extra.get(MEDIA_KWARG)
        cache = DynamicCache()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as padded_positions, every row
        logits = self._forward(embeds, mask, positions, cache, extra)
        tokens = self._sample(new, logits)
        state = (cache, mask, positions[:, -1] + 1, tokens, media)
        self._merge(new, state)
        for req, tok in zip(new, tokens.tolist()):
            self._accept(req, tok, done)

    def _decode(self, done: list[Request]) -> None:
        embeds = self.model.language.embed(self._last[:, None])
        self._mask = torch.cat([self._mask, self._mask.new_ones((self._mask.shape[0], 1))], dim=1)
        extra = {MEDIA_KWARG: self._media} if self._media is not None else {}
        logits = self._forward(embeds, self._mask, self._pos[:, None], self._cache, extra)
        self._pos = self._pos + 1
        tokens = self._sample(self._rows, logits)
        self._last = tokens
        for req, tok in zip(self._rows, tokens.tolist()):
            self._accept(req, tok, done)

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """One token per row: argmax for greedy rows, the request's generator for the others."""
        tokens = logits.argmax(dim=-1)
        for i, req in enumerate(reqs):
            p = req.params
            if p.greedy:
                continue
            row = logits[i] / p.temperature
            if p.top_k:
                kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if p.top_p < 1:
                sorted_logits, order = torch.sort(row, descending=True)
                probs = sorted_logits.softmax(-1)
                # drop tokens once the mass before them reaches top_p (the first token always stays)
                drop = (probs.cumsum(-1) - probs) >= p.top_p
                row = row.scatter(0, order[drop], float("-inf"))
            probs = row.softmax(-1)
            tokens[i] = torch.multinomial(probs, 1, generator=req.generator)[0]
        return tokens

    def _merge(self, new: list[Request], state: tuple) -> None:
        """Add prefilled rows to the running batch (left-padding the shorter side)."""
        cache, mask, pos, last, media = state
        if not self._rows:
            self._rows, self._cache, self._mask, self._pos, self._last, self._media = list(new), cache, mask, pos, last, media
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)

        def left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        layers = []
        for a, b in zip(self._cache.layers, cache.layers):
            keys = torch.cat([left(a.keys, length - old_len, 2), left(b.keys, length - new_len, 2)])
            values = torch.cat([left(a.values, length - old_len, 2), left(b.values, length - new_len, 2)])
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([left(self._mask, length - old_len, 1), left(mask, length - new_len, 1)])
        self._pos = torch.cat([self._pos, pos])
        self._last = torch.cat([self._last, last])
        if self._media is not None or media is not None:
            if self._media is None or media is None:
                raise RuntimeError("cross-attention context missing for part of the batch")
            self._media = MediaContext.concat([self._media, media])
        self._rows += new

    def _retire(self) -> None:
        """Remove finished rows from the batch; trim columns that are padding in every row."""
        keep = [i for i, r in enumerate(self._rows) if not r.finished]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._pos, self._last, self._media = [], None, None, None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask[index]
        start = int((mask.sum(dim=0) > 0).nonzero()[0])
        mask = mask[:, start:]
        layers = [(layer.keys[index, :, start:], layer.values[index, :, start:]) for layer in self._cache.layers]
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = mask
        self._pos, self._last = self._pos[index], self._last[index]
        if self._media is not None:
            self._media = self._media.select(index)
        self._rows = [self._rows[i] for i in keep]

    # -- tokens -> text ---------------------------------------------------------------------------
    def _accept(self, req: Request, token: int, done: list[Request]) -> None:
        """Record a sampled token; emit new text; finish on a stop token, stop string or length."""
        if req.finished:
            return
        if token in self.stop_ids:
            self._finish(req, "stop", done)
            return
        req.output_ids.append(token)
        tok = self.processor.tokenizer
        raw = tok.decode(req.output_ids)
        if any(s in raw for s in (*self.template_stops, *req.params.stop)):
            self._finish(req, "stop", done)
            return
        limit = min(req.params.max_tokens, self.context_length - req.prompt_tokens)
        if len(req.output_ids) >= limit:
            self._finish(req, "length", done)
            return
        visible = tok.decode(req.output_ids, skip_special_tokens=True).lstrip()
        safe = self._safe_prefix(visible, req.params.stop)
        if len(safe) > len(req.emitted) and safe.startswith(req.emitted):
            self._emit(req, StreamDelta(safe[len(req.emitted):]))
            req.emitted = safe

    def _safe_prefix(self, text: str, stops: Sequence[str]) -> str:
        """``text`` without a tail that could still turn into a stop string, an unfinished
        character, or trailing whitespace (which a final strip would remove)."""
        hold = 0
        for s in (*self.template_stops, *stops):
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = text[: len(text) - hold]
        if safe.endswith("\ufffd"):
            safe = safe.rstrip("\ufffd")
        return safe.rstrip()

    def _finish(self, req: Request, reason: str, done: list[Request]) -> None:
        ids, stopped = finish_ids(self.processor, req.output_ids, req.params.stop)
        if stopped and reason == "length":
            reason = "stop"
        text = self.processor.decode(ids)
        req.finish_reason = reason
        req.completion = Completion(text, tuple(ids), reason, req.prompt_tokens, len(req.output_ids))
        rest = text[len(req.emitted):] if text.startswith(req.emitted) else ""
        self._emit(req, StreamDelta(rest, reason))
        done.append(req)

    @staticmethod
    def _emit(req: Request, delta: StreamDelta) -> None:
        if req.sink is not None:
            req.sink(req, delta)

    # -- encoder-decoder: static groups -----------------------------------------------------------
    def _run_static(self, group: list[Request], done: list[Request]) -> None:
        """Encoder-decoder requests: one ``generate`` per group of equal settings (no joining)."""
        from vlmkit.inference.pipeline import generate_kwargs

        by_params: dict[SamplingParams, list[Request]] = {}
        for r in group:
            by_params.setdefault(r.params, []).append(r)
        for params, reqs in by_params.items():
            ids, mask, pixel_values, counts = self._left_padded(reqs)
            kwargs = generate_kwargs(self.processor, params)
            with torch.random.fork_rng(devices=[]):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                out = self.model.generate(ids, mask, pixel_values, counts, **kwargs)
            for r, row in zip(reqs, out.tolist()):
                for t in row:
                    if r.finished:
                        break
                    self._accept(r, t, done)
                if not r.finished:
                    self._finish(r, "length", done)


# ---------------------------------------------------------------------------------------------
class Stream:
    """The deltas of one submitted request, readable from threads (``for d in stream``) and from
    asyncio (``async for d in stream``), any number of times (each reader sees every delta)."""

    def __init__(self, runner: "EngineThread"):
        self._runner = runner
        self._cond = threading.Condition()
        self._deltas: list[StreamDelta] = []
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self.request: Request | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.request.prompt_tokens if self.request else 0

    def _deliver(self, req: Request, delta: StreamDelta) -> None:
        with self._cond:
            self._deltas.append(delta)
            listeners = list(self._listeners)
            self._cond.notify_all()
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, delta)
            except RuntimeError:  # the reader's loop is closed
                pass

    def __iter__(self) -> Iterator[StreamDelta]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._deltas):
                    self._cond.wait()
                delta = self._deltas[i]
            i += 1
            yield delta
            if delta.finish_reason is not None:
                return

    async def __aiter__(self):
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            for d in self._deltas:
                queue.put_nowait(d)
            self._listeners.append((asyncio.get_running_loop(), queue))
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            with self._cond:
                self._listeners = [(lp, q) for lp, q in self._listeners if q is not queue]

    @property
    def completion(self) -> Completion | None:
        """The request's :class:`Completion` once it finished, else ``None`` (never blocks)."""
        return self.request.completion if self.request is not None and self.request.finished else None

    def cancel(self) -> None:
        """Stop generating (the last delta says ``cancelled``)."""
        if self.request is not None:
            self._runner.cancel(self.request)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request finished; its :class:`Completion`.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._deltas) and self._deltas[-1].finish_reason is not None, timeout):
                raise TimeoutError(f"request not finished within {timeout} s")
        return self.request.completion


class EngineThread:
    """Runs an :class:`Engine` in a daemon thread that owns the model; other threads submit.

    Args:
        engine: the engine.
        max_queued: most requests waiting or running at once (:class:`QueueFullError` beyond).
    """

    def __init__(self, engine: Engine, max_queued: int = 64):
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.engine = engine
        self.max_queued = int(max_queued)
        self._wake = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self.failures = 0  # steps that raised (their requests ended with finish_reason 'error')
        self.last_failure: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="vlmkit-engine", daemon=True)
        self._thread.start()

    def submit(self, encoded: Encoded, params: SamplingParams | None = None, strict: bool = True) -> Stream:
        """Queue a request; returns its :class:`Stream`. ``strict`` as in :meth:`Engine.add`.

        Raises:
            QueueFullError: ``max_queued`` requests are already waiting or running.
            PromptTooLongError: it does not fit the context.
            RuntimeError: the engine thread stopped (closed, or failed: the cause is chained).
        """
        if self._closed or self._error is not None:
            raise RuntimeError("the engine is not running") from self._error
        stream = Stream(self)
        with self._wake:
            if self.engine.num_waiting + self.engine.num_running >= self.max_queued:
                raise QueueFullError(f"{self.max_queued} requests are already queued or running; retry later")
            stream.request = self.engine.add(encoded, params, stream._deliver, strict)
            self._wake.notify()
        return stream

    def cancel(self, request: Request) -> None:
        self.engine.cancel(request)
        with self._wake:
            self._wake.notify()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.engine.has_work():
                    self._wake.wait()
                if self._closed:
                    break
            try:
                self.engine.step()
            except Exception as exc:  # noqa: BLE001 - one failed step ends its requests, not the server
                self.failures += 1
                self.last_failure = exc
                log.exception("engine step failed; its %d requests were ended", self.engine.num_waiting + self.engine.num_running)
                self.engine.abort_all("error")
            except BaseException as exc:
                self._error = exc
                self.engine.abort_all("cancelled")
                raise

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (running requests are cancelled)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)
        if self.engine.has_work():
            self.engine.abort_all("cancelled")
