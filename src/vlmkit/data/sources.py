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


class _RenderOnly:
    """Stands in for the tokenizer still to be trained when templates render its training text: the
    BPE's end-of-text as BOS/EOS, and no special tokens of its own around a text."""

    bos_token = eos_token = BPE_EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [0]}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return ["" for _ in ids]


def iter_texts(samples: list[Sample], template: Any = None, system_prompt: str | None = None) -> Iterator[str]:
    """Text of ``samples`` for tokenizer training: each conversation rendered by ``template`` (so the
    template's own markers are learned too), or the raw message texts without one."""
    stub = _RenderOnly()
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
            problem = "is not a file" if Path(p).exists() else "does not exist"
            raise _row_error(origin, f"image file {p} {problem}")
    return Sample(messages, paths, origin, {"id": row.get("id")})


@dataclass(frozen=True)
class _BadLine:
    """A JSONL line that is not JSON (kept in the row stream so it can be skipped and counted)."""

    reason: str


def _read_text(path: Path) -> str:
    """The file as text: UTF-8 (a byte-order mark is allowed).

    Raises:
        DataError: the file cannot be read or is not UTF-8 (names the byte offset).
    """
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path} could not be read: {exc.strerror or exc}") from None


def read_rows(path: Path, limit: int | None = None) -> list[tuple[str, Any]]:
    """``(where, row)`` for the rows of a JSON list or a JSONL file (``where``: "row i" / "line n").
    A JSONL line that is not JSON becomes a :class:`_BadLine` row.

    Raises:
        DataError: the file is not UTF-8, a JSON file does not parse or is not a list.
    """
    text = _read_text(path)
    if path.suffix == ".jsonl":
        rows: list[tuple[str, Any]] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if limit and len(rows) == limit:
                break
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                rows.append((f"line {n}", _BadLine(f"not valid JSON ({exc.msg} at column {exc.colno})")))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a list of conversation rows at the top level, got {type(data).__name__}"
                        " (JSON Lines files need the .jsonl extension)")
    return [(f"row {i}", row) for i, row in enumerate(data[:limit] if limit else data)]


@SOURCES.register("llava_json")
def load_llava_json(cfg: DataConfig) -> SourceResult:
    """LLaVA conversation JSON (a list of rows) or JSONL (one row per line).

    Raises:
        DataError: missing/unparseable file or, unless ``skip_bad_rows``, any invalid row.
    """
    if not cfg.path:
        raise DataError("data.path is required for source 'llava_json' (a LLaVA conversation .json or .jsonl)")
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file (data.path must name a .json or .jsonl file)")
    folder = Path(cfg.image_folder) if cfg.image_folder else path.parent
    result = SourceResult([])
    for i, (where, row) in enumerate(read_rows(path, cfg.limit)):
        row_id = row.get("id") if isinstance(row, dict) else None
        origin = f"{path} {where}" + (f" (id {row_id!r})" if row_id is not None else "")
        if isinstance(row, _BadLine):
            if not cfg.skip_bad_rows:
                raise _row_error(origin, row.reason)
            result.skipped.append(f"{origin}: {row.reason}")
            continue
        try:
            result.samples.append(parse_llava_row(row, origin, folder))
        except DataError as exc:
            if not cfg.skip_bad_rows:
                raise
            result.skipped.append(str(exc))
    return result
