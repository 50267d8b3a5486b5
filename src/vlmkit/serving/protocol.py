"""The OpenAI chat-completions protocol: request bodies -> :class:`ChatRequest`, results -> response bodies.

:func:`parse_chat_request` checks a decoded JSON body field by field and raises :class:`RequestError`
naming the first bad field the way OpenAI does (``messages[1].content[0].image_url.url``). It does
not fetch or decode images (:mod:`vlmkit.serving.media` does, in a worker thread); it returns their
URLs in conversation order, each with its field path.

Content becomes vlmkit's text: the parts of a message are joined with newlines and each
``image_url`` part becomes an ``<image>`` placeholder where it stands, so ``[image, text]`` is
``"<image>\\n" + text``, exactly what :meth:`~vlmkit.processing.processor.VLMProcessor.prompt` builds
for ``pipeline.chat(image, text)``. Consecutive messages of one role are joined the same way;
``developer`` messages count as ``system``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from vlmkit.inference.engine import SamplingParams
from vlmkit.processing.templates import Message
from vlmkit.processing.tokenizer import IMAGE_TOKEN

#: The OpenAI error ``type`` of each status this server answers with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

#: Most stop strings per request, and the longest one (each is checked against every decoded token).
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256

#: Request fields this server does not implement, with the values that mean "not used" (accepted).
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


class RequestError(Exception):
    """A request the server refuses, as an OpenAI error envelope.

    Args:
        status: the HTTP status (400 bad input, 401 key, 404 model, 413 body size, 429 queue full).
        message: what is wrong and what would be valid.
        param: the request field at fault (``messages[0].content``), or ``None``.
        code: a short machine-readable reason (``invalid_base64``), or ``None``.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope for ``status``."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad(param: str | None, message: str, code: str | None = None) -> RequestError:
    """A 400 :class:`RequestError` about ``param``; the message is prefixed with the field's name."""
    return RequestError(400, f"{param}: {message}" if param else message, param, code)


@dataclass(frozen=True)
class ImageRef:
    """One image of a request: its URL as sent and the field it came from (for error messages)."""

    url: str
    param: str


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request.

    ``history`` holds every message before the last user turn (system first when there is one);
    ``prompt`` is the last user turn's text, ``images`` every image of the conversation in
    placeholder order. ``params.max_tokens`` is the asked-for count, or the server's limit when
    the request named none (``max_tokens_param`` is then ``None``).
    """

    model: str
    history: list[Message]
    prompt: str
    images: list[ImageRef]
    params: SamplingParams
    max_tokens_param: str | None
    stream: bool = False
    include_usage: bool = False


def parse_body(raw: bytes) -> Any:
    """Decode a JSON request body.

    Raises:
        RequestError: 400 when the body is not UTF-8 JSON (the message gives the position).
    """
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise bad(None, f"the request body is not UTF-8 text: {exc}", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise bad(None, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                  "invalid_json") from None
    except RecursionError:
        raise bad(None, "the request body is nested too deeply", "invalid_json") from None


def parse_chat_request(body: Any, model_name: str, max_tokens: int, max_images: int) -> ChatRequest:
    """Check a decoded ``POST /v1/chat/completions`` body.

    Args:
        body: the decoded JSON.
        model_name: the served model's id (any other ``model`` is a 404).
        max_tokens: the most tokens a request may ask for, and the default when it names none.
        max_images: the most images in one request.

    Raises:
        RequestError: 400 for a missing, mistyped or out-of-range field (named in ``param``), too
            many images, an unsupported feature (tools, logprobs, ``n`` > 1, ...); 404 for another model.
    """
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {_kind(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", f"required: a non-empty string naming the model (this server serves {model_name!r})")
    if model != model_name:
        raise RequestError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")
    for name, off in UNSUPPORTED_FIELDS.items():
        value = body.get(name)
        if value is not None and not any(isinstance(value, bool) == isinstance(v, bool) and value == v for v in off):
            raise bad(name, f"not supported by this server (got {value!r})", "unsupported_parameter")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad("n", f"only n=1 is supported, got {n!r}", "unsupported_parameter")

    history, prompt, images = _parse_messages(body.get("messages"), max_images)

    requested, max_param = None, None
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are sent
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise bad(name, f"must be an integer >= 1, got {value!r}")
        if value > max_tokens:
            raise bad(name, f"{value} is more than this server's limit of {max_tokens} tokens (--max-tokens)")
        requested, max_param = value, name
        break
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p", "must be > 0 (use temperature 0 for greedy decoding)")
    top_k = body.get("top_k")
    if top_k is None or top_k == -1:
        top_k = 0
    if not _is_int(top_k) or top_k < 0:
        raise bad("top_k", f"must be an integer >= 1 (0 or -1: off), got {top_k!r}")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**63):
        raise bad("seed", f"must be an integer in [-2**63, 2**63), got {seed!r}")
    stop = _stop(body.get("stop"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", f"must be true or false, got {stream!r}")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", f"must be an object, got {_kind(options)}")
        include_usage = options.get("include_usage")
        if include_usage is None:
            include_usage = False
        if not isinstance(include_usage, bool):
            raise bad("stream_options.include_usage", f"must be true or false, got {include_usage!r}")
    params = SamplingParams(max_tokens=requested or max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=stop)
    return ChatRequest(model, history, prompt, images, params, max_param, bool(stream), include_usage)


# ---------------------------------------------------------------------------------------------
def _parse_messages(messages: Any, max_images: int) -> tuple[list[Message], str, list[ImageRef]]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"required: a non-empty list of messages, got {_kind(messages)}")
    turns: list[tuple[str, str, int]] = []  # (role, text, index of its first message)
    images: list[ImageRef] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(where, f"must be an object with role and content, got {_kind(msg)}")
        role = msg.get("role")
        if role == "developer":
            role = "system"
        if role in ("tool", "function"):
            raise bad(f"{where}.role", f"{role} messages are not supported (this server does not call tools)",
                      "unsupported_parameter")
        if role not in ("system", "user", "assistant"):
            raise bad(f"{where}.role", f"must be 'system', 'developer', 'user' or 'assistant', got {role!r}")
        if msg.get("tool_calls"):
            raise bad(f"{where}.tool_calls", "tool calls are not supported", "unsupported_parameter")
        text = _content(msg.get("content"), f"{where}.content", images if role == "user" else None)
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n" + text, turns[-1][2])
        else:
            turns.append((role, text, i))
    if len(images) > max_images:
        raise bad("messages", f"the request has {len(images)} images, more than this server's limit of {max_images} "
                              "(--max-images-per-request)", "too_many_images")
    for k, (role, _, i) in enumerate(turns):
        if role == "system" and k > 0:
            raise bad(f"messages[{i}].role", "a system message may only come first")
    body = turns[1:] if turns[0][0] == "system" else turns
    if not body or body[0][0] != "user":
        where = f"messages[{body[0][2]}].role" if body else "messages"
        raise bad(where, "the conversation must start with a user message (after an optional system message)")
    if body[-1][0] != "user":
        raise bad(f"messages[{body[-1][2]}].role", "the last message must be from the user")
    history = [Message(role, text) for role, text, _ in turns[:-1]]
    return history, turns[-1][1], images


def _content(content: Any, where: str, images: list[ImageRef] | None) -> str:
    """A message's text with ``<image>`` where its image parts stand (appended to ``images``);
    ``images`` is ``None`` for roles that may not hold images."""
    if isinstance(content, str):
        _check_text(content, where)
        return content
    if not isinstance(content, list):
        raise bad(where, f"must be a string or a list of content parts, got {_kind(content)}")
    if not content:
        raise bad(where, "must not be an empty list")
    pieces = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad(at, f"must be an object with a type, got {_kind(part)}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"{at}.text", f"required: a string, got {_kind(text)}")
            _check_text(text, f"{at}.text")
            pieces.append(text)
        elif kind == "image_url":
            if images is None:
                raise bad(at, "only user messages may hold images")
            image = part.get("image_url")
            if not isinstance(image, dict):
                raise bad(f"{at}.image_url", f"required: an object with a url, got {_kind(image)}")
            url = image.get("url")
            if not isinstance(url, str) or not url:
                raise bad(f"{at}.image_url.url", f"required: a data:, http(s):// or file:// URL, got {_kind(url)}")
            images.append(ImageRef(url, f"{at}.image_url.url"))
            pieces.append(IMAGE_TOKEN)
        else:
            raise bad(f"{at}.type", f"must be 'text' or 'image_url', got {kind!r}", "unsupported_content")
    return "\n".join(pieces)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON may carry lone surrogates ("\\ud800"), which no tokenizer takes
        raise bad(where, f"text is not valid Unicode ({exc.reason} at character {exc.start})") from None
    if IMAGE_TOKEN in text:
        raise bad(where, f"text may not contain {IMAGE_TOKEN!r} (it marks where an image goes); "
                         "send images as image_url parts")


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    values = [stop] if isinstance(stop, str) else stop
    if not isinstance(values, list):
        raise bad("stop", f"must be a string or a list of strings, got {_kind(stop)}")
    if len(values) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(values)}")
    for k, s in enumerate(values):
        where = "stop" if isinstance(stop, str) else f"stop[{k}]"
        if not isinstance(s, str) or not s:
            raise bad(where, f"must be a non-empty string, got {s!r}")
        if len(s) > MAX_STOP_LENGTH:
            raise bad(where, f"at most {MAX_STOP_LENGTH} characters, got {len(s)}")
        _check_text(s, where)
    return tuple(values)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"must be a number in [{low:g}, {high:g}], got {value!r}")
    if not low <= value <= high:
        raise bad(name, f"must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null or missing)"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """``usage``: prompt tokens (image tokens included), completion tokens, their sum."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice."""
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage,
    }


def chunk_body(rid: str, created: int, model: str, delta: dict[str, str], finish_reason: str | None = None,
               include_usage: bool = False) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice (``usage: null`` when the stream will end with usage)."""
    chunk: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk_body(rid: str, created: int, model: str, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage}


def models_body(model: str, created: int) -> dict[str, Any]:
    """``GET /v1/models``: the one served model."""
    return {"object": "list", "data": [model_body(model, created)]}


def model_body(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "vlmkit"}


def sse(obj: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or the literal ``[DONE]``) and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
