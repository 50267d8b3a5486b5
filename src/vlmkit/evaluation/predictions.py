"""The resumable predictions file ``<out>/<task>/predictions.jsonl``.

One JSON row per answered question, ``{"task", "id", "prediction", "answers", "prompt", "model",
"max_new_tokens"}``, appended and flushed after every batch. Reading it back gives the questions
already answered, so a stopped run continues where it left off. Every row names its task and what
produced it, so a file from another task, another model or another generation length is refused
instead of being mixed into the scores; a line cut short by an interruption is dropped (that question
is answered again); an id that appears twice is kept once when both rows agree and refused when they
differ.

A distributed evaluation (``torchrun ... vlmkit eval``) has each process append to its own
``predictions.rank<r>.jsonl`` beside the file (no two processes write one file); the main process
merges them into ``predictions.jsonl`` when the task is answered and removes them. Rank files left by
an interrupted run (of any world size) are read back like the main file, so any rerun resumes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from vlmkit.evaluation.runner import EvalItem
from vlmkit.evaluation.tasks.base import EvalDataError

log = logging.getLogger("vlmkit")


class PredictionLog:
    """Predictions of one task on disk.

    Args:
        path: the JSONL file (created on the first append).
        task: the task name every row must carry.
        model: an id of the model (see :func:`vlmkit.evaluation.runner.model_fingerprint`); None
            skips the check (a model given in memory).
        max_new_tokens: the generation length every row must have been made with.
    """

    def __init__(self, path: str | Path, task: str, model: str | None = None, max_new_tokens: int | None = None):
        self.path = Path(path)
        self.task = task
        self.model = model
        self.max_new_tokens = max_new_tokens

    def load(self) -> dict[str, str]:
        """``{question id: prediction}`` of the rows on disk (a cut-off last line is removed from the file).

        Raises:
            EvalDataError: a row is not JSON (other than a cut-off last line), lacks ``id`` /
                ``prediction``, belongs to another task, or repeats an id with a different prediction.
        """
        if not self.path.is_file():
            return {}
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            # an interrupted write leaves a partial last row; drop it so appends start on a fresh line
            cut = raw.rfind(b"\n") + 1
            log.warning("%s: dropping an incomplete last line (an interrupted run); that question is answered again", self.path)
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
            raw = raw[:cut]
        done: dict[str, str] = {}
        first_line: dict[str, int] = {}
        duplicates = 0
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{self.path}, line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{where}: not valid JSON ({exc}); delete the line or the file") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{where}: expected an object, got {type(row).__name__}")
            if row.get("task") != self.task:
                raise EvalDataError(
                    f"{self.path} holds predictions of task {row.get('task')!r} (line {n}), not {self.task!r}; "
                    f"use another --out folder or move the file away"
                )
            self._check_producer(row, n)
            qid, prediction = row.get("id"), row.get("prediction")
            if not isinstance(qid, str) or not isinstance(prediction, str):
                field = "id" if not isinstance(qid, str) else "prediction"
                raise EvalDataError(f"{where}: field {field!r} is missing or not a string")
            if qid in done:
                if done[qid] != prediction:
                    raise EvalDataError(
                        f"{self.path}: question id {qid!r} appears twice (lines {first_line[qid]} and {n}) with different "
                        f"predictions; delete one of them"
                    )
                duplicates += 1
                continue
            done[qid] = prediction
            first_line[qid] = n
        if duplicates:
            log.warning("%s: %d repeated row(s) with identical predictions counted once", self.path, duplicates)
        return done

    def for_rank(self, rank: int) -> PredictionLog:
        """The log process ``rank`` of a distributed run appends to: ``<stem>.rank<rank>.jsonl`` beside this file."""
        return PredictionLog(self.path.with_name(f"{self.path.stem}.rank{rank}.jsonl"), self.task, self.model, self.max_new_tokens)

    def rank_files(self) -> list[Path]:
        """Rank files beside this file (left by a distributed run, any world size), in rank order."""
        if not self.path.parent.is_dir():
            return []
        name = re.compile(re.escape(self.path.stem) + r"\.rank(0|[1-9][0-9]*)\.jsonl")
        found = [(int(m.group(1)), p) for p in self.path.parent.iterdir() if (m := name.fullmatch(p.name)) and p.is_file()]
        return [p for _, p in sorted(found)]

    def load_all(self) -> dict[str, str]:
        """:meth:`load` of this file and of every rank file beside it: ``{question id: prediction}``
        (cut-off last lines are removed from the files, so call it on the main process first).

        Raises:
            EvalDataError: as :meth:`load` for any of the files, or a question id whose predictions
                differ between two files (both named).
        """
        done = self.load()
        source = dict.fromkeys(done, self.path)
        for path in self.rank_files():
            for qid, prediction in PredictionLog(path, self.task, self.model, self.max_new_tokens).load().items():
                if qid in done and done[qid] != prediction:
                    raise EvalDataError(
                        f"question id {qid!r} has different predictions in {source[qid]} and {path} (files of an "
                        f"interrupted distributed run); delete one of the rows"
                    )
                done[qid] = prediction
                source.setdefault(qid, path)
        return done

    def merge(self, items: Sequence[EvalItem], done: Mapping[str, str]) -> int:
        """Append the rows of the questions of ``items`` (in that order) that ``done`` answers and this
        file lacks, then remove the rank files beside it. Only the main process may call it; the rank
        files' answers must be in ``done`` (:meth:`load_all`, or gathered from the processes).

        Returns the number of rows appended. A crash between the append and the removal leaves
        repeated identical rows, which :meth:`load_all` counts once.
        """
        on_disk = self.load()
        missing = [it for it in items if it.id in done and it.id not in on_disk]
        if missing:
            self.append(missing, [done[it.id] for it in missing])
        for path in self.rank_files():
            path.unlink(missing_ok=True)
        return len(missing)

    def remove(self) -> None:
        """Delete this file and its rank files (predictions of another model). Main process only."""
        self.path.unlink(missing_ok=True)
        for path in self.rank_files():
            path.unlink(missing_ok=True)

    def _check_producer(self, row: dict, n: int) -> None:
        if self.model is not None and row.get("model") not in (None, self.model):
            what = f"model {row.get('model')!r}, this run evaluates {self.model!r}"
        elif self.max_new_tokens is not None and row.get("max_new_tokens") not in (None, self.max_new_tokens):
            what = f"max_new_tokens={row.get('max_new_tokens')}, this run uses {self.max_new_tokens}"
        else:
            return
        raise EvalDataError(f"{self.path}, line {n}: predicted by {what}; use another --out folder or delete the file")

    def append(self, items: Sequence[EvalItem], predictions: Sequence[str]) -> None:
        """Append one row per item and flush to the OS, so an interruption loses at most the batch in flight."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for it, p in zip(items, predictions):
                row = {"task": self.task, "id": it.id, "prediction": p, "answers": list(it.answers), "prompt": it.prompt,
                       "model": self.model, "max_new_tokens": self.max_new_tokens}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
