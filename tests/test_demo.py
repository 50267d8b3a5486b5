"""The embedded default on a short schedule: ``vlmkit demo`` trains both stages on easy-VQA, evaluates on
test images never seen in training and answers questions; accuracy must be well above the majority answer."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("easy_vqa")

from conftest import TEST_SEED, check_quality  # noqa: E402
from vlmkit.cli import main  # noqa: E402

SHORT = [
    "stages.align.data.limit=1200", "stages.align.epochs=6",
    "stages.instruct.data.limit=3000", "stages.instruct.epochs=3",
    "eval.limit=800",
]


@pytest.mark.slow
def test_short_demo_schedule_learns(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--questions", "3", f"train.seed={TEST_SEED}", *SHORT]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "eval.json").read_text())
    assert record["task"] == "easyvqa" and record["title"] == "easy-VQA" and record["split"] == "test"
    scores = {k: v for k, v in record.items() if k not in ("task", "title", "split", "metric")}
    assert scores["total"] == 800
    # QUALITY_SHORT_DEMO
    check_quality("short demo: accuracy minus majority baseline", scores["accuracy"] - scores["majority_baseline"], above=0.25)
    check_quality("short demo: what color", scores["per_type"]["what color"], above=0.6)
    assert f"easy-VQA test accuracy: {100 * scores['accuracy']:.2f}%" in printed
    assert printed.count("  Q: ") == 3 and "demo wall time" in printed
    demo_predictions = [json.loads(x) for x in (out / "eval" / "easyvqa" / "predictions.jsonl").read_text().splitlines()]
    assert len(demo_predictions) == 800

    # `vlmkit eval` on the saved model (read back from disk, another batch size) gives the demo's
    # predictions and scores
    assert main(["eval", "--model", str(out / "model"), "--task", "easyvqa", "--limit", "800", "--batch-size", "64",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "easyvqa" / "scores.json").read_text()) == scores
    rows = [json.loads(x) for x in (tmp_path / "eval" / "easyvqa" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prediction"]) for r in rows] == [(r["id"], r["prediction"]) for r in demo_predictions]
