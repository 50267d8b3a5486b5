"""Distributed evaluation: ``torchrun --nproc-per-node 2 -m vlmkit eval`` shares the questions, merges
the per-process files and scores exactly as one process does; a bad image on one process stops all of
them; the files an interrupted distributed run leaves behind are picked up by any rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from processes import torchrun
from test_eval_runner import Recording, read_predictions, tiny  # noqa: F401  (tiny: the saved model fixture)
from test_eval_tasks import make_vqav2
from vlmkit.evaluation.runner import EvalOptions, discard_predictions, prepare, run_tasks
from vlmkit.evaluation.tasks import EvalDataError, TaskData

easy_vqa = pytest.importorskip("easy_vqa")


def rank_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("predictions.rank*.jsonl"))


def test_torchrun_eval_equals_one_process_and_a_bad_image_stops_every_process(tiny, tmp_path, capsys):
    """One launch, two tasks: easy-VQA is answered by both processes, merged and scored as one process
    does; VQAv2 then meets a bad image on one process, and both stop with its message, the answers
    before it kept in their rank files; a one-process rerun answers the rest and merges."""
    from vlmkit.cli import main

    _, model_dir = tiny
    vqav2 = make_vqav2(tmp_path / "vqav2", n=9)
    image = vqav2 / "val2014" / "COCO_val2014_000000000103.jpg"  # question 1003, the 4th
    good = image.read_bytes()
    common = ["--model", str(model_dir), "--task", "easyvqa", "--task", "vqav2", "--data", f"vqav2={vqav2}",
              "--limit", "9", "--batch-size", "2", "--max-new-tokens", "3"]

    # the reference: one process, in this process
    assert main(["eval", *common, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()

    image.write_bytes(b"not an image")
    out = tmp_path / "two"
    done = torchrun(["-m", "vlmkit", "eval", *common, "--out", str(out)], timeout=300)
    assert done.returncode != 0, done.stdout
    error = "vlmkit eval: error: VQAv2: question '1003'"
    assert done.stderr.count(error) == 2, done.stderr[-4000:]  # raised on both processes, not only where it happened

    # easy-VQA: finished before the failure, merged, scored as by one process
    expected = read_predictions(tmp_path / "one" / "easyvqa" / "predictions.jsonl")
    assert read_predictions(out / "easyvqa" / "predictions.jsonl") == expected  # each id once (read_predictions checks)
    assert list(expected) == [json.loads(line)["id"] for line in (out / "easyvqa" / "predictions.jsonl").read_text().splitlines()]
    assert rank_files(out / "easyvqa") == []
    assert json.loads((out / "easyvqa" / "scores.json").read_text()) == json.loads((tmp_path / "one" / "easyvqa" / "scores.json").read_text())
    assert "easy-VQA test: accuracy" not in done.stdout  # a failed call prints no results

    # VQAv2: the answers before the bad image are in the two rank files, nothing merged yet
    assert rank_files(out / "vqav2") == ["predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    assert not (out / "vqav2" / "predictions.jsonl").exists() and not (out / "vqav2" / "scores.json").exists()
    saved: dict[str, str] = {}
    for name in rank_files(out / "vqav2"):
        saved.update(read_predictions(out / "vqav2" / name))
    reference = read_predictions(tmp_path / "one" / "vqav2" / "predictions.jsonl")
    assert 0 < len(saved) < 9 and "1003" not in saved
    assert all(saved[q] == reference[q] for q in saved)

    # a one-process rerun answers only the rest and merges the rank files
    image.write_bytes(good)
    assert main(["eval", *common, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (f"VQAv2: resuming, {len(saved)} of 9 questions already answered in {out / 'vqav2' / 'predictions.jsonl'} "
            f"and 2 file(s) of an interrupted distributed run") in printed
    assert read_predictions(out / "vqav2" / "predictions.jsonl") == reference
    assert rank_files(out / "vqav2") == []
    for task in ("easyvqa", "vqav2"):
        assert json.loads((out / task / "scores.json").read_text()) == json.loads((tmp_path / "one" / task / "scores.json").read_text())
    assert (out / "results.md").read_text() == (tmp_path / "one" / "results.md").read_text()


def test_rank_files_of_an_interrupted_run_are_resumed_by_one_process(tiny, tmp_path, caplog):
    """Files of an interrupted 3-process run (one with a cut-off last line, one repeating a row of the
    main file) are read back; a one-process rerun asks only the questions in none of them, merges
    everything into predictions.jsonl in question order and removes the rank files."""
    pipe, _ = tiny
    vqav2 = make_vqav2(tmp_path / "vqav2", n=9)
    tasks = {"vqav2": TaskData("vqav2", vqav2)}
    options = EvalOptions(batch_size=2, max_new_tokens=3, progress=False)
    full = run_tasks(pipe, tasks, tmp_path / "full", options)["vqav2"]
    lines = (tmp_path / "full" / "vqav2" / "predictions.jsonl").read_text().splitlines()  # one row per question, in order
    expected = read_predictions(tmp_path / "full" / "vqav2" / "predictions.jsonl")

    work = tmp_path / "out" / "vqav2"
    work.mkdir(parents=True)
    (work / "predictions.jsonl").write_text(lines[0] + "\n")
    (work / "predictions.rank0.jsonl").write_text(lines[3] + "\n" + lines[6] + "\n")
    (work / "predictions.rank1.jsonl").write_text(lines[0] + "\n" + lines[4] + "\n")  # 0 was merged, 1 was in flight
    (work / "predictions.rank2.jsonl").write_text(lines[5] + "\n" + lines[8][:30])  # killed while writing 8
    (work / "predictions.rankx.jsonl").write_text("not a rank file: never read\n")

    (run,) = prepare(tasks, tmp_path / "out", options)
    assert sorted(run.done) == sorted(json.loads(lines[k])["id"] for k in (0, 3, 4, 5, 6))
    assert (work / "predictions.rank2.jsonl").read_text() == lines[5] + "\n"  # the cut-off line is dropped

    again = Recording(pipe)
    assert run_tasks(again, tasks, tmp_path / "out", options)["vqav2"] == full
    assert again.asked == 4  # questions 1, 2, 7 and 8
    assert read_predictions(work / "predictions.jsonl") == expected
    ids = [json.loads(line)["id"] for line in (work / "predictions.jsonl").read_text().splitlines()]
    assert ids == [json.loads(lines[k])["id"] for k in (0, 3, 4, 5, 6, 1, 2, 7, 8)]  # the merged ones first, in question order
    assert rank_files(work) == ["predictions.rankx.jsonl"]

    # a training run that retrained the model drops the old answers, rank files included
    (work / "predictions.rank1.jsonl").write_text(lines[4] + "\n")
    (run,) = prepare(tasks, tmp_path / "out", options)
    discard_predictions(run)
    assert run.done == {} and rank_files(work) == ["predictions.rankx.jsonl"] and not (work / "predictions.jsonl").exists()

    # two files that disagree about a question are refused, naming both
    (work / "predictions.jsonl").write_text(lines[3] + "\n")
    (work / "predictions.rank0.jsonl").write_text(lines[3].replace('"prediction": "', '"prediction": "other ') + "\n")
    with pytest.raises(EvalDataError, match=r"question id '1003' has different predictions in .*/predictions\.jsonl and "
                                            r".*predictions\.rank0\.jsonl"):
        prepare(tasks, tmp_path / "out", options)
