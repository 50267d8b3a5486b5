"""Data sources: files on disk -> validated :class:`Sample` lists.

A source is a function ``(DataConfig) -> SourceResult`` registered in :data:`SOURCES`. Structural
problems are found up front for every row (so a run does not die hours in); image decoding and
token length are checked when a sample is encoded. Every error names the file, the row and the
row's id; with ``skip_bad_rows`` the row is skipped and counted instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vlmkit.config import DataConfig
from vlmkit.processing.templates import Message
from vlmkit.processing.tokenizer import BPE_EOS, IMAGE_TOKEN
from vlmkit.registry import Registry

log = logging.getLogger("vlmkit")

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A data row is invalid; the message names the file, the row and what would be valid."""


@dataclass
class Sample:
    """One conversation with its images (paths, in placeholder order) and where it came from."""

    messages: list[Message]
    images: list[str]
    origin: str
    meta: dict = field(default_factory=dict)


@dataclass
class SourceResult:
    samples: list[Sample]
    skipped: list[str] = field(default_factory=list)
    """One line per skipped row: where and why."""


SourceFn = Callable[[DataConfig], SourceResult]
SOURCES: Registry[SourceFn] = Registry("data source")


def iter_texts(samples: list[Sample], template: Any = None, system_prompt: str | None = None) -> Iterator[str]:
    """Text of ``samples`` for tokenizer training: each conversation rendered by ``template`` (so the
    template's own markers are learned too), or the raw message texts without one."""
    stub = SimpleNamespace(bos_token=BPE_EOS, eos_token=BPE_EOS)
    for s in samples:
        if template is None:
            yield from (m.content for m in s.messages)
            continue
        messages = s.messages
        if system_prompt is not None and messages[0].role != "system":
            messages = [Message("system", system_prompt), *messages]
        yield "".join(text for text, _ in template.segments(messages, stub))


def _row_error(origin: str, reason: str) -> DataError:
    return DataError(f"{origin}: {reason}")


def parse_llava_row(row: object, origin: str, image_folder: Path) -> Sample:
    """Validate one LLaVA conversation row and turn it into a :class:`Sample`.

    Raises:
        DataError: the row is not an object, has no/empty ``conversations``, a turn lacks ``from``/``value``
            or has an unknown role, roles do not alternate human/gpt, the ``<image>`` count differs from
            the number of images, or an image file does not exist.
    """
    if not isinstance(row, dict):
        raise _row_error(origin, f"a row must be an object with 'conversations', got {type(row).__name__}")
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise _row_error(origin, "'conversations' is missing or empty; it must be a list of {'from', 'value'} turns")
    messages = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise _row_error(origin, f"turn {t} must be an object with 'from' and 'value'")
        role = ROLE_MAP.get(str(turn["from"]).lower())
        if role is None:
            raise _row_error(origin, f"turn {t} has 'from'={turn['from']!r}; valid: human, gpt (or user, assistant, system)")
        if not isinstance(turn["value"], str):
            raise _row_error(origin, f"turn {t} 'value' must be a string")
        messages.append(Message(role, turn["value"]))
    body = messages[1:] if messages[0].role == "system" else messages
    if not body:
        raise _row_error(origin, "the conversation has no human/gpt turns")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise _row_error(origin, f"turn {i} is from {m.role!r} where {expected!r} was expected (human and gpt alternate, human first)")
    if body[-1].role != "assistant":
        raise _row_error(origin, "the conversation ends with a human turn; the last turn must be gpt")
    image = row.get("image")
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise _row_error(origin, "'image' must be a path string or a list of path strings")
    n_tokens = sum(m.content.count(IMAGE_TOKEN) for m in messages)
    if n_tokens != len(images):
        raise _row_error(origin, f"the text has {n_tokens} {IMAGE_TOKEN} placeholder(s) but the row has {len(images)} image(s)")
    for m in messages:
        if m.role != "user" and IMAGE_TOKEN in m.content:
            raise _row_error(origin, f"{IMAGE_TOKEN} may only appear in human turns")
    paths = [str(image_folder / p) for p in images]
    for p in paths:
        if not Path(p).is_file():
            raise _row_error(origin, f"image file {p} does not exist")
    return Sample(messages, paths, origin, {"id": row.get("id")})


@SOURCES.register("llava_json")
def load_llava_json(cfg: DataConfig) -> SourceResult:
    """LLaVA conversation JSON (a list of rows) or JSONL (one row per line).

    Raises:
        DataError: missing/unparseable file or, unless ``skip_bad_rows``, any invalid row.
    """
    if not cfg.path:
        raise DataError("data.path is required for source 'llava_json' (a LLaVA conversation .json or .jsonl)")
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    folder = Path(cfg.image_folder) if cfg.image_folder else path.parent
    text = path.read_text()
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path} must hold a list of conversation rows at the top level")
    result = SourceResult([])
    for i, row in enumerate(rows[: cfg.limit] if cfg.limit else rows):
        row_id = row.get("id") if isinstance(row, dict) else None
        origin = f"{path} row {i}" + (f" (id {row_id!r})" if row_id is not None else "")
        try:
            result.samples.append(parse_llava_row(row, origin, folder))
        except DataError as exc:
            if not cfg.skip_bad_rows:
                raise
            result.skipped.append(str(exc))
    return result
