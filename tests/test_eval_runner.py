"""The evaluation runner on a tiny random model: batch-size invariance, resume without double counting,
refusing another task's predictions, MM-Vet against a local OpenAI-compatible judge, and ``vlmkit eval``."""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import tiny_model_config
from test_eval_tasks import make_mmvet, make_vqav2
from vlmkit.evaluation.judge import JudgeClient, JudgeError
from vlmkit.evaluation.runner import EvalOptions, prepare, run_tasks
from vlmkit.evaluation.tasks import EvalDataError, TaskData
from vlmkit.inference.pipeline import VLMPipeline
from vlmkit.models.build import build_model, save_model

easy_vqa = pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def tiny(bpe_tokenizer, tmp_path_factory):
    """(pipeline, saved model folder) of a tiny random CLIP + Llama model."""
    import torch

    torch.manual_seed(0)
    cfg = tiny_model_config()
    model, processor = build_model(cfg, tokenizer=copy.deepcopy(bpe_tokenizer))
    folder = save_model(model, processor, cfg, tmp_path_factory.mktemp("eval-model") / "model")
    return VLMPipeline(model, processor), folder


@pytest.fixture(scope="module")
def vqav2(tmp_path_factory) -> Path:
    return make_vqav2(tmp_path_factory.mktemp("data") / "vqav2", n=9)


class Recording:
    """Wraps a pipeline: counts the questions it is asked; raises KeyboardInterrupt after ``stop_after`` batches."""

    def __init__(self, pipe, stop_after: int | None = None):
        self.pipe, self.stop_after, self.batches = pipe, stop_after, []

    def answer(self, prompts, images, settings):
        if self.stop_after is not None and len(self.batches) == self.stop_after:
            raise KeyboardInterrupt
        self.batches.append(len(prompts))
        return self.pipe.answer(prompts, images, settings)


def read_predictions(path: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}), "an id was written twice"
    return {r["id"]: r["prediction"] for r in rows}


def test_batch_size_1_and_8_give_the_same_predictions_and_scores(tiny, vqav2, tmp_path):
    pipe, _ = tiny
    runs = {}
    for bs in (1, 8):
        out = tmp_path / f"bs{bs}"
        tasks = {"vqav2": TaskData("vqav2", vqav2), "easyvqa": TaskData("easyvqa")}
        runs[bs] = run_tasks(pipe, tasks, out, EvalOptions(batch_size=bs, limit=9, max_new_tokens=4, progress=False))
        assert len(read_predictions(out / "vqav2" / "predictions.jsonl")) == 9
    for task in ("vqav2", "easyvqa"):
        assert read_predictions(tmp_path / "bs1" / task / "predictions.jsonl") == read_predictions(tmp_path / "bs8" / task / "predictions.jsonl")
        assert runs[1][task] == runs[8][task] == json.loads((tmp_path / "bs8" / task / "scores.json").read_text())
    table = (tmp_path / "bs8" / "results.md").read_text()
    assert "| VQAv2 (`vqav2`) | accuracy |" in table and "| easy-VQA (`easyvqa`) | accuracy |" in table


def test_easyvqa_scores_equal_evaluate_easyvqa(tiny, tmp_path):
    from vlmkit.evaluation.easyvqa import evaluate_easyvqa

    pipe, _ = tiny
    scores = run_tasks(pipe, {"easyvqa": TaskData("easyvqa")}, tmp_path, EvalOptions(batch_size=4, limit=6, max_new_tokens=3, progress=False))["easyvqa"]
    reference, _, _ = evaluate_easyvqa(pipe, "test", batch_size=4, limit=6, max_new_tokens=3, progress=False)
    assert scores == reference


def test_resume_after_an_interruption_answers_only_the_rest(tiny, vqav2, tmp_path):
    pipe, _ = tiny
    options = EvalOptions(batch_size=3, max_new_tokens=3, progress=False)
    full = run_tasks(pipe, {"vqav2": TaskData("vqav2", vqav2)}, tmp_path / "full", options)["vqav2"]
    expected = read_predictions(tmp_path / "full" / "vqav2" / "predictions.jsonl")

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_tasks(Recording(pipe, stop_after=2), {"vqav2": TaskData("vqav2", vqav2)}, out, options)
    path = out / "vqav2" / "predictions.jsonl"
    assert len(path.read_text().splitlines()) == 6  # two batches were saved as they were made
    with path.open("a") as fh:
        fh.write('{"task": "vqav2", "id": "10')  # a write cut short by a kill
    again = Recording(pipe)
    resumed = run_tasks(again, {"vqav2": TaskData("vqav2", vqav2)}, out, options)["vqav2"]
    assert again.batches == [3]  # only the 9 - 6 unanswered questions
    assert read_predictions(path) == expected and resumed == full

    # nothing left: no model call; a repeated identical row is counted once; a conflicting one is refused
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[0]]) + "\n")
    idle = Recording(pipe)
    assert run_tasks(idle, {"vqav2": TaskData("vqav2", vqav2)}, out, options)["vqav2"] == full and idle.batches == []
    row = json.loads(lines[0])
    path.write_text("\n".join(lines + [json.dumps({**row, "prediction": row["prediction"] + " changed"})]) + "\n")
    with pytest.raises(EvalDataError, match=rf"question id '{row['id']}' appears twice \(lines 1 and 10\) with different predictions"):
        run_tasks(pipe, {"vqav2": TaskData("vqav2", vqav2)}, out, options)


def test_a_predictions_file_of_another_task_is_refused(tiny, vqav2, tmp_path):
    pipe, _ = tiny
    run_tasks(pipe, {"vqav2": TaskData("vqav2", vqav2)}, tmp_path, EvalOptions(batch_size=8, limit=2, max_new_tokens=2, progress=False))
    (tmp_path / "easyvqa").mkdir()
    (tmp_path / "easyvqa" / "predictions.jsonl").write_text((tmp_path / "vqav2" / "predictions.jsonl").read_text())
    with pytest.raises(EvalDataError, match=r"easyvqa/predictions\.jsonl holds predictions of task 'vqav2' \(line 1\), not 'easyvqa'"):
        prepare({"easyvqa": TaskData("easyvqa")}, tmp_path, EvalOptions())


# ---------------------------------------------------------------------------------------------
# MM-Vet with a judge

class JudgeHandler(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        case = body["messages"][-1]["content"].rsplit("Question: ", 1)[1]
        content = "1.0" if case.startswith("What is shown?") else "Score: 0.25 (partly right)"
        payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        """Keep the test output free of the server's request log."""


@pytest.fixture
def judge_server():
    JudgeHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_mmvet_is_scored_by_the_judge_and_judgments_are_reused(tiny, tmp_path, judge_server):
    pipe, _ = tiny
    data = {"mmvet": TaskData("mmvet", make_mmvet(tmp_path / "mm-vet"))}
    options = EvalOptions(batch_size=2, max_new_tokens=3, progress=False, judge=JudgeClient(judge_server, "judge-1", "sk-test", backoff=0))
    scores = run_tasks(pipe, data, tmp_path / "out", options)["mmvet"]
    assert scores["score"] == pytest.approx((0.25 + 1.0) / 2) and scores["unparsed"] == 0
    assert scores["per_capability"] == {"math": 0.25, "ocr": 0.25, "rec": 1.0}
    assert scores["per_capability_set"] == {"math,ocr": 0.25, "rec": 1.0}
    first = JudgeHandler.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test" and first["body"]["model"] == "judge-1"
    assert "Ground truth: -1 <AND> -5" in first["body"]["messages"][-1]["content"]
    assert len(JudgeHandler.requests) == 2
    assert run_tasks(pipe, data, tmp_path / "out", options)["mmvet"] == scores and len(JudgeHandler.requests) == 2


def test_unreachable_judge_is_a_clear_error(tiny, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    pipe, _ = tiny
    data = {"mmvet": TaskData("mmvet", make_mmvet(tmp_path / "mm-vet"))}
    options = EvalOptions(batch_size=2, max_new_tokens=4, progress=False, judge=JudgeClient(url, "judge-1", retries=1, backoff=0.01))
    with pytest.raises(JudgeError, match=rf"judge endpoint {url}/chat/completions is unreachable after 2 attempt\(s\)"):
        run_tasks(pipe, data, tmp_path / "out", options)
    assert len(read_predictions(tmp_path / "out" / "mmvet" / "predictions.jsonl")) == 2  # kept for the next run
    with pytest.raises(EvalDataError, match=r"mmvet is scored by an LLM judge: pass --judge-url"):
        prepare(data, tmp_path / "out", EvalOptions())


# ---------------------------------------------------------------------------------------------
def test_cli_eval_two_tasks_writes_results_md(tiny, vqav2, tmp_path, capsys):
    from vlmkit.cli import main

    _, model_dir = tiny
    out = tmp_path / "out"
    argv = ["eval", "--model", str(model_dir), "--task", "vqav2", "--task", "easyvqa", "--data", f"vqav2={vqav2}",
            "--limit", "4", "--batch-size", "4", "--max-new-tokens", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    easy = json.loads((out / "easyvqa" / "scores.json").read_text())
    assert f"easy-VQA test: accuracy {100 * easy['accuracy']:.2f}% ({easy['correct']}/4) -> {out}" in printed
    assert "VQAv2: accuracy " in printed and f"results table: {out / 'results.md'}" in printed
    table = (out / "results.md").read_text()
    assert table.count("| 4 |") == 3  # vqav2 accuracy, easy-VQA accuracy + majority baseline, 4 questions each

    # the same command again answers nothing new; another generation length or a changed model is refused
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"VQAv2: resuming, 4 of 4 questions already answered in {out / 'vqav2' / 'predictions.jsonl'}" in printed
    assert "easy-VQA: resuming, 4 of 4 questions already answered" in printed
    assert main([*argv, "--max-new-tokens", "5"]) == 2
    assert "predicted by max_new_tokens=3, this run uses 5; use another --out folder" in capsys.readouterr().err
    weights = next(p for p in Path(model_dir).rglob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # as if retrained
    assert main(argv) == 2
    assert "vqav2/predictions.jsonl, line 1: predicted by model 'model@" in capsys.readouterr().err

    assert main(["eval", "--model", str(model_dir), "--task", "vqav2", "--out", str(out)]) == 2
    assert "task vqav2 needs its data: --data vqav2=FOLDER" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--task", "vqa3", "--out", str(out)]) == 2
    assert "unknown evaluation task 'vqa3'" in capsys.readouterr().err
