"""The OpenAI-compatible HTTP server: :func:`create_app` builds the FastAPI app for one model.

Endpoints: ``POST /v1/chat/completions`` (plain or streamed as server-sent events), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, and the web chat page (``GET /`` and ``/static/...``).

A request goes: API key -> body size -> JSON -> fields (:mod:`~vlmkit.serving.protocol`) -> images
and prompt encoding (a worker thread: :mod:`~vlmkit.serving.media`, ``processor.prompt``) -> the
engine. Generative models run on one :class:`~vlmkit.inference.engine.EngineThread` (continuous
batching: concurrent requests share decode steps); encoder-only models answer by classification, one
request at a time in a worker thread. Every refusal is an OpenAI error envelope with a 4xx status;
a client that disconnects cancels its generation.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.inference.engine import Engine, EngineThread, PromptTooLongError, QueueFullError, SamplingParams, StreamDelta
from vlmkit.processing.processor import EncodingError, Encoded
from vlmkit.processing.templates import TemplateError
from vlmkit.serving.media import load_image_url
from vlmkit.serving.options import ServeOptions
from vlmkit.serving.protocol import (
    ChatRequest,
    RequestError,
    bad,
    chunk_body,
    completion_body,
    error_body,
    model_body,
    models_body,
    parse_body,
    parse_chat_request,
    sse,
    usage_body,
    usage_chunk_body,
)

log = logging.getLogger("vlmkit.serving")

#: The web chat page's folder (``index.html`` and its assets).
STATIC_DIR = Path(__file__).parent / "static"


class Job(abc.ABC):
    """One accepted request: its prompt size (image tokens included), its deltas, how to cancel it."""

    prompt_tokens: int = 0

    @abc.abstractmethod
    def deltas(self) -> AsyncIterator[StreamDelta]:
        """The answer's text deltas, the last with its ``finish_reason``."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop the request (a no-op once it finished)."""

    @property
    @abc.abstractmethod
    def completion_tokens(self) -> int:
        """Tokens of the answer (known once the last delta arrived)."""

    @property
    @abc.abstractmethod
    def text(self) -> str | None:
        """The whole answer once the last delta arrived (else ``None``)."""


class EngineJob(Job):
    """A request generating on the engine thread (a :class:`~vlmkit.inference.engine.Stream`)."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.prompt_tokens = stream.prompt_tokens

    def deltas(self) -> AsyncIterator[StreamDelta]:
        return self.stream.__aiter__()

    def cancel(self) -> None:
        self.stream.cancel()

    @property
    def completion_tokens(self) -> int:
        completion = self.stream.request.completion
        return completion.completion_tokens if completion is not None else 0

    @property
    def text(self) -> str | None:
        completion = self.stream.request.completion
        return completion.text if completion is not None else None


class ClassifierJob(Job):
    """A request of an encoder-only model: the answer vocabulary's most likely entry, as one delta.
    It holds one of the service's ``max_queued`` places until it finished or was cancelled unstarted."""

    def __init__(self, service: "ChatService", encoded: Encoded):
        self.service = service
        self.encoded = encoded
        self.prompt_tokens = int(encoded.input_ids.numel())
        self._answer_tokens = 0
        self._answer: str | None = None
        self._started = False
        self._released = False

    async def deltas(self) -> AsyncIterator[StreamDelta]:
        self._started = True
        try:
            answer, self._answer_tokens = await asyncio.to_thread(self.service.classify, self.encoded)
        finally:
            self._release()
        self._answer = answer
        yield StreamDelta(answer, "stop")

    def cancel(self) -> None:
        # a started classification is one forward pass: it finishes and releases its place itself
        if not self._started:
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.service.release()

    @property
    def completion_tokens(self) -> int:
        return self._answer_tokens

    @property
    def text(self) -> str | None:
        return self._answer


class JobStreamingResponse(StreamingResponse):
    """A streamed response that cancels its job however it ends (finished, client gone, or never
    started because the client left before the first chunk)."""

    def __init__(self, content: AsyncIterator[bytes], job: Job, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


class ChatService:
    """The model behind the app: encodes requests and runs them (engine thread or classifier).

    Args:
        pipeline: a loaded :class:`~vlmkit.inference.pipeline.VLMPipeline`.
        options: the server's limits.
    """

    def __init__(self, pipeline: Any, options: ServeOptions):
        self.pipeline = pipeline
        self.options = options
        self.generative = bool(pipeline.generative)
        self.created = int(time.time())
        # one encoding at a time: a fast tokenizer raises "Already borrowed" when two threads use it
        # while one changes its padding or truncation state
        self._encode_lock = threading.Lock()
        self._classify_lock = threading.Lock()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.runner: EngineThread | None = None
        if self.generative:
            self.engine: Engine | None = Engine(pipeline.model, pipeline.processor, max_batch_size=options.max_batch_size)
            self.context_length = self.engine.context_length
        else:
            self.engine = None
            self.context_length = int(pipeline.processor.max_length)

    def start(self) -> None:
        """Start the engine thread (idempotent; nothing to start for encoder-only models)."""
        if self.generative and self.runner is None:
            self.runner = EngineThread(self.engine, max_queued=self.options.max_queued)

    def close(self) -> None:
        """Stop the engine thread (running requests end ``cancelled``)."""
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    @property
    def healthy(self) -> bool:
        return not self.generative or (self.runner is not None and self.runner.healthy)

    def load(self) -> dict[str, int]:
        """Requests waiting and running now."""
        if self.engine is not None:
            return {"waiting": self.engine.num_waiting, "running": self.engine.num_running}
        return {"waiting": 0, "running": self._pending}

    # -- requests -----------------------------------------------------------------------------
    def encode(self, chat: ChatRequest) -> Encoded:
        """Load the request's images and encode its conversation (blocking: call in a worker thread).

        Raises:
            RequestError: 400 for a bad image, a conversation the template cannot render, or a prompt
                longer than the model's ``max_length``.
        """
        images = [load_image_url(ref.url, ref.param, self.options) for ref in chat.images]
        try:
            with self._encode_lock:
                return self.pipeline.processor.prompt(chat.prompt, images, chat.history)
        except (EncodingError, TemplateError) as exc:
            raise bad("messages", str(exc), "invalid_prompt") from None

    def submit(self, chat: ChatRequest, encoded: Encoded) -> Job:
        """Queue an encoded request.

        Raises:
            RequestError: 400 when the prompt (plus ``max_tokens``) does not fit the context, 429 when
                ``max_queued`` requests are already waiting or running, 503 when the engine stopped.
        """
        if not self.generative:
            with self._pending_lock:
                if self._pending >= self.options.max_queued:
                    raise RequestError(429, f"{self.options.max_queued} requests are already queued; retry later",
                                       None, "queue_full")
                self._pending += 1
            return ClassifierJob(self, encoded)
        params = self._params(chat, encoded)
        if self.runner is None:
            self.start()
        try:
            return EngineJob(self.runner.submit(encoded, params))
        except QueueFullError as exc:
            raise RequestError(429, f"{exc} (--max-queued {self.options.max_queued})", None, "queue_full") from None
        except PromptTooLongError as exc:
            raise bad(chat.max_tokens_param or "messages", str(exc), "context_length_exceeded") from None
        except RuntimeError as exc:
            raise RequestError(503, f"the engine is not running: {exc.__cause__ or exc}", None, "engine_stopped") from None

    def _params(self, chat: ChatRequest, encoded: Encoded) -> SamplingParams:
        if chat.max_tokens_param is not None:
            return chat.params
        room = self.context_length - int(encoded.input_ids.numel())
        if room < 1:
            raise bad("messages", f"the prompt has {encoded.input_ids.numel()} tokens (image tokens included), which "
                                  f"leaves no room in the model's context of {self.context_length} tokens",
                      "context_length_exceeded")
        return replace(chat.params, max_tokens=min(chat.params.max_tokens, room))

    def classify(self, encoded: Encoded) -> tuple[str, int]:
        """``(answer, its token count)`` of an encoder-only model (blocking; one request at a time)."""
        processor = self.pipeline.processor
        with self._classify_lock:
            batch = {k: v.to(self.pipeline.device) for k, v in processor.collate([encoded], padding_side="left").items()}
            logits = self.pipeline.model.classify(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                                  batch["image_counts"])
        answer = processor.answers[int(logits[0].argmax())]
        with self._encode_lock:
            tokens = len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
        return answer, tokens

    def release(self) -> None:
        """Free the queue place of a finished classification."""
        with self._pending_lock:
            self._pending -= 1


# ---------------------------------------------------------------------------------------------
def create_app(pipeline: Any, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app serving ``pipeline`` under ``options.model_name``.

    The engine thread starts with the app (its lifespan) and stops with it.

    Args:
        pipeline: a :class:`~vlmkit.inference.pipeline.VLMPipeline` (any format vlmkit loads).
        options: limits and policy; :class:`ServeOptions` defaults when ``None``.
    """
    options = options or ServeOptions()
    service = ChatService(pipeline, options)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.close()

    # no /docs, /redoc, /openapi.json: the API is OpenAI's, and FastAPI's pages load their assets from a CDN
    app = FastAPI(title="vlmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _install_error_handlers(app)

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise RequestError(401, "missing API key: send the header 'Authorization: Bearer <key>'", None,
                               "invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), options.api_key.encode()):
            raise RequestError(401, "invalid API key", None, "invalid_api_key")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await _read_body(request, options.max_body_bytes)
        chat = parse_chat_request(parse_body(raw), options.model_name, options.max_tokens, options.max_images_per_request)
        encoded = await asyncio.to_thread(service.encode, chat)
        job = service.submit(chat, encoded)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return JobStreamingResponse(_events(job, chat, rid, created, options.model_name), job,
                                        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, job, rid, created, options.model_name)

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return models_body(options.model_name, service.created)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        if model_id != options.model_name:
            raise RequestError(404, f"the model {model_id!r} does not exist; this server serves {options.model_name!r}",
                               "model", "model_not_found")
        return model_body(options.model_name, service.created)

    @app.get("/health")
    async def health():
        body = {"status": "ok" if service.healthy else "error", "model": options.model_name, **service.load()}
        return JSONResponse(body, status_code=200 if service.healthy else 503)

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise RequestError(404, "the web chat page is not installed (vlmkit/serving/static/index.html)")
        return FileResponse(page, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (from Content-Length, or while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is {int(declared):,} bytes, more than this server's limit of "
                                f"{limit:,} (--max-body-bytes)", None, "request_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"the request body is more than this server's limit of {limit:,} bytes "
                                    "(--max-body-bytes)", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client goes away (runs beside the response; cancelled after it)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _complete(request: Request, job: Job, rid: str, created: int, model: str) -> JSONResponse:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        pieces, reason = [], None
        async for delta in job.deltas():
            pieces.append(delta.text)
            reason = delta.finish_reason
    finally:
        watcher.cancel()
        job.cancel()
    if reason == "error":
        raise RequestError(500, "generation failed inside the engine (logged on the server); other requests are unaffected",
                           None, "engine_error")
    if reason not in ("stop", "length"):
        raise RequestError(503, "the request was cancelled before it finished (the engine stopped)", None, "cancelled")
    text = job.text if job.text is not None else "".join(pieces)
    body = completion_body(rid, created, model, text, reason, usage_body(job.prompt_tokens, job.completion_tokens))
    return JSONResponse(body)


async def _events(job: Job, chat: ChatRequest, rid: str, created: int, model: str) -> AsyncIterator[bytes]:
    """The SSE stream: a role delta, content deltas, a finish chunk, the usage chunk when asked, ``[DONE]``.
    A client that disconnects ends it (Starlette cancels the response; :class:`JobStreamingResponse`
    then cancels the job)."""
    usage = chat.include_usage
    try:
        yield sse(chunk_body(rid, created, model, {"role": "assistant", "content": ""}, include_usage=usage))
        async for delta in job.deltas():
            if delta.finish_reason == "error":
                yield sse(error_body(500, "generation failed inside the engine (logged on the server)", code="engine_error"))
                return
            if delta.finish_reason == "cancelled":  # the client left (then nobody reads this), or the engine stopped
                yield sse(error_body(503, "the request was cancelled before it finished (the engine stopped)",
                                     code="cancelled"))
                return
            if delta.text:
                yield sse(chunk_body(rid, created, model, {"content": delta.text}, include_usage=usage))
            if delta.finish_reason is not None:
                yield sse(chunk_body(rid, created, model, {}, delta.finish_reason, include_usage=usage))
        if usage:
            yield sse(usage_chunk_body(rid, created, model, usage_body(job.prompt_tokens, job.completion_tokens)))
        yield sse("[DONE]")
    finally:
        job.cancel()


def _install_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI envelope; bad input is a 4xx, never a 500."""

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(error_body(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception):
        log.exception("internal error", exc_info=exc)
        return JSONResponse(error_body(500, f"internal server error: {type(exc).__name__}"), status_code=500)
