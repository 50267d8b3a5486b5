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

from conftest import TINY_ANSWERS, tiny_model_config
from test_eval_tasks import make_mmvet, make_vqav2
from vlmkit.evaluation.judge import JudgeClient, JudgeError
from vlmkit.evaluation.runner import EvalOptions, prepare, run_tasks
from vlmkit.evaluation.tasks import EvalDataError, TaskData
from vlmkit.inference.pipeline import VLMPipeline
from vlmkit.models.build import build_model
from vlmkit.formats import load_model, save_model

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


class Recording(VLMPipeline):
    """Wraps a pipeline: counts the questions it encodes (``asked``); raises KeyboardInterrupt when
    asked to encode question number ``stop_after + 1``."""

    def __init__(self, pipe, stop_after: int | None = None):
        self.stop_after, self.asked = stop_after, 0
        outer = self

        class Processor:
            def __getattr__(self, name):
                return getattr(pipe.processor, name)

            def prompt(self, *args, **kwargs):
                if outer.stop_after is not None and outer.asked == outer.stop_after:
                    raise KeyboardInterrupt
                outer.asked += 1
                return pipe.processor.prompt(*args, **kwargs)

        super().__init__(pipe.model, Processor())


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
        # the engine keeps 2 x 3 questions queued; the first 3 are answered and saved before the
        # 7th is encoded, where the interruption strikes
        run_tasks(Recording(pipe, stop_after=6), {"vqav2": TaskData("vqav2", vqav2)}, out, options)
    path = out / "vqav2" / "predictions.jsonl"
    assert len(path.read_text().splitlines()) == 3  # the finished batch was saved as it was made
    with path.open("a") as fh:
        fh.write('{"task": "vqav2", "id": "10')  # a write cut short by a kill
    again = Recording(pipe)
    resumed = run_tasks(again, {"vqav2": TaskData("vqav2", vqav2)}, out, options)["vqav2"]
    assert again.asked == 6  # only the 9 - 3 unanswered questions
    assert read_predictions(path) == expected and resumed == full

    # nothing left: no model call; a repeated identical row is counted once; a conflicting one is refused
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[0]]) + "\n")
    idle = Recording(pipe)
    assert run_tasks(idle, {"vqav2": TaskData("vqav2", vqav2)}, out, options)["vqav2"] == full and idle.asked == 0
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


def test_progress_bar_shows_the_task_and_its_count(vqav2, tmp_path, capsys):
    class AlwaysYes:
        def answer(self, prompts, images, settings):
            return ["yes"] * len(prompts)

    tasks = {"vqav2": TaskData("vqav2", vqav2)}
    run_tasks(AlwaysYes(), tasks, tmp_path / "on", EvalOptions(batch_size=4, progress=True))
    err = capsys.readouterr().err
    assert "VQAv2: 100%" in err and "9/9" in err  # the task's title and questions answered / total
    run_tasks(AlwaysYes(), tasks, tmp_path / "off", EvalOptions(batch_size=4, progress=False))
    assert "VQAv2" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# an encoder-only (RoBERTa) model answers by classification over its answer vocabulary

def test_cli_eval_classifies_with_an_encoder_only_model(bpe_tokenizer, vqav2, tmp_path, capsys):
    import torch

    from vlmkit.cli import main
    from vlmkit.evaluation.metrics import vqa_accuracy

    torch.manual_seed(0)
    cfg = tiny_model_config(backbone="roberta", template="qa")
    model, processor = build_model(cfg, tokenizer=copy.deepcopy(bpe_tokenizer))
    items = prepare({"vqav2": TaskData("vqav2", vqav2)}, tmp_path / "probe", EvalOptions())[0].items

    def run(folder: Path, out: Path) -> tuple[dict[str, str], dict]:
        argv = ["eval", "--model", str(folder), "--task", "vqav2", "--data", f"vqav2={vqav2}", "--batch-size", "4", "--out", str(out)]
        assert main(argv) == 0
        capsys.readouterr()
        return read_predictions(out / "vqav2" / "predictions.jsonl"), json.loads((out / "vqav2" / "scores.json").read_text())

    # 1. the random model: every prediction is the argmax answer of the reloaded model's classifier
    #    on that question alone, and the score is the VQA metric of those answers
    predictions, scores = run(save_model(model, processor, cfg, tmp_path / "random"), tmp_path / "out-random")
    reloaded, reprocessor = load_model(tmp_path / "random")
    pipe = VLMPipeline(reloaded, reprocessor)
    for it in items:
        batch = pipe._prompt_batch([it.prompt], [list(it.images)], None)
        with torch.no_grad():
            logits = reloaded.classify(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_counts"])
        assert predictions[it.id] == TINY_ANSWERS[int(logits.argmax())], it.id
    assert scores["accuracy"] == pytest.approx(sum(vqa_accuracy(predictions[it.id], list(it.answers)) for it in items) / len(items))
    assert scores["total"] == 9

    # 2. a classifier biased to "blue": every reply is "blue", which 6 of the 10 annotators gave on the
    #    four odd questions (min(1, 6 / 3) = 1 each) and none on the five "yes" questions: 4/9
    with torch.no_grad():
        model.language.vqa_head[-1].bias[TINY_ANSWERS.index("blue")] += 100.0
    predictions, scores = run(save_model(model, processor, cfg, tmp_path / "blue"), tmp_path / "out-blue")
    assert set(predictions.values()) == {"blue"} and len(predictions) == 9
    assert scores["accuracy"] == pytest.approx(4 / 9)
    assert scores["per_answer_type"] == {"other": 1.0, "yes/no": 0.0}


# ---------------------------------------------------------------------------------------------
# MM-Vet with a judge

class JudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge: ``script`` maps the start of the graded question to the replies it
    gives on its 1st, 2nd, ... request for that case (the last one repeats)."""

    requests: list[dict] = []
    script: dict[str, list[str]] = {}

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        case = body["messages"][-1]["content"].rsplit("Question: ", 1)[1]
        prefix = next(p for p in self.script if case.startswith(p))
        asked = sum(r["body"]["messages"][-1]["content"].rsplit("Question: ", 1)[1].startswith(prefix) for r in self.requests)
        replies = self.script[prefix]
        content = replies[min(asked, len(replies)) - 1]
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


def cases(requests: list[dict]) -> list[tuple[str, float, bool]]:
    """(question start, temperature, whether the retry nudge was added) of each judge request."""
    from vlmkit.evaluation.judge import RETRY_NUDGE

    out = []
    for r in requests:
        content = r["body"]["messages"][-1]["content"]
        out.append((content.rsplit("Question: ", 1)[1][:10], r["body"]["temperature"], content.endswith(RETRY_NUDGE)))
    return out


def test_mmvet_is_scored_by_the_judge_and_judgments_are_reused(tiny, tmp_path, judge_server):
    pipe, _ = tiny
    # v1_1 is graded at once; v1_0's first reply does not start with a number ("Score:" is the first
    # token), so it is asked again, with the nudge and still greedy, and "0.25 (partly right)" reads 0.25.
    JudgeHandler.script = {"What is shown?": ["1.0"], "What is x": ["Score: 0.25", "0.25 (partly right)"]}
    data = {"mmvet": TaskData("mmvet", make_mmvet(tmp_path / "mm-vet"))}
    options = EvalOptions(batch_size=2, max_new_tokens=3, progress=False, judge=JudgeClient(judge_server, "judge-1", "sk-test", backoff=0))
    scores = run_tasks(pipe, data, tmp_path / "out", options)["mmvet"]
    assert scores["score"] == pytest.approx((0.25 + 1.0) / 2) and scores["unparsed"] == 0
    assert scores["per_capability"] == {"math": 0.25, "ocr": 0.25, "rec": 1.0}
    assert scores["per_capability_set"] == {"math,ocr": 0.25, "rec": 1.0}
    first = JudgeHandler.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test" and first["body"]["model"] == "judge-1"
    assert "Ground truth: -1 <AND> -5" in first["body"]["messages"][-1]["content"]
    assert cases(JudgeHandler.requests) == [("What is x ", 0.0, False), ("What is x ", 0.0, True), ("What is sh", 0.0, False)]
    rows = [json.loads(line) for line in (tmp_path / "out" / "mmvet" / "judgments.jsonl").read_text().splitlines()]
    assert [(r["id"], r["score"], r["parsed"], r["tries"]) for r in rows] == [("v1_0", 0.25, True, 2), ("v1_1", 1.0, True, 1)]
    assert run_tasks(pipe, data, tmp_path / "out", options)["mmvet"] == scores and len(JudgeHandler.requests) == 3


def test_mmvet_judge_without_a_readable_score_gives_zero_after_five_tries(tiny, tmp_path, judge_server, caplog):
    """MM-Vet's evaluator: up to 5 replies, the temperature rising by 0.5 from the second retry on
    (0.0, 0.0, 0.5, 1.0, 1.5), then 0.0 for the answer; here it is also logged and recorded."""
    pipe, _ = tiny
    JudgeHandler.script = {"What is shown?": ["0.9 looks right"], "What is x": ["I cannot tell."]}
    data = {"mmvet": TaskData("mmvet", make_mmvet(tmp_path / "mm-vet"))}
    options = EvalOptions(batch_size=2, max_new_tokens=3, progress=False, judge=JudgeClient(judge_server, "judge-1", backoff=0))
    with caplog.at_level("WARNING", logger="vlmkit"):
        scores = run_tasks(pipe, data, tmp_path / "out", options)["mmvet"]
    assert cases(JudgeHandler.requests) == [
        ("What is x ", 0.0, False), ("What is x ", 0.0, True), ("What is x ", 0.5, True), ("What is x ", 1.0, True),
        ("What is x ", 1.5, True), ("What is sh", 0.0, False)]
    assert scores["score"] == pytest.approx((0.0 + 0.9) / 2) and scores["unparsed"] == 1
    assert scores["per_capability"] == {"math": 0.0, "ocr": 0.0, "rec": 0.9}
    assert "mmvet v1_0: no score in [0, 1] in 5 judge replies (last 'I cannot tell.'); scored 0.0" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "out" / "mmvet" / "judgments.jsonl").read_text().splitlines()]
    assert rows[0] == {"id": "v1_0", "prediction": rows[0]["prediction"], "score": 0.0, "parsed": False, "tries": 5,
                       "reply": "I cannot tell."}
    # recorded like the evaluator's grade file: a re-run asks nothing and still counts it unparsed
    assert run_tasks(pipe, data, tmp_path / "out", options)["mmvet"] == scores and len(JudgeHandler.requests) == 6


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
