"""A recipe's ``eval`` section: any evaluation task, checked when the recipe is loaded and its files read
before the first training step; the run prints and records the task it evaluated."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import tiny_recipe_dict, write_llava_data
from vlmkit.cli import main
from vlmkit.config import ConfigError, load_recipe


def _recipe(tmp_path, eval_section: dict | None) -> str:
    data = write_llava_data(tmp_path / "data", per_color=1)
    recipe = tiny_recipe_dict(data, tmp_path / "run", [
        {"name": "sft", "policy": {"connector": "full", "language": "full"}, "max_steps": 2, "batch_size": 4, "lr": 1e-3,
         "data": {"source": "llava_json", "path": str(data)}}])
    if eval_section is not None:
        recipe["eval"] = eval_section
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _gqa(folder, image, answers=("red", "blue")) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "1.jpg").write_bytes(image.read_bytes())
    rows = {f"q{k}": {"imageId": "1", "question": "what color is the image?", "answer": a} for k, a in enumerate(answers)}
    (folder / "testdev_balanced_questions.json").write_text(json.dumps(rows))


@pytest.mark.parametrize("section, message", [
    ({"task": "nosuch"}, "eval.task='nosuch' is not an evaluation task; valid: .*easyvqa.*vqav2"),
    ({"task": "vqav2"}, "task vqav2 needs its data: eval.data=FOLDER"),
    ({"task": "gqa", "data": "/no/such/folder"}, "/no/such/folder does not exist"),
    ({"task": "gqa", "files": {"answers": "/tmp"}}, "eval.files has unknown role.* answers for task gqa; valid: questions, images"),
    ({"task": "mmvet", "data": "/tmp"}, "scored by an LLM judge"),
    ({"task": "easyvqa", "limit": 0}, "eval.limit=0 must be > 0"),
])
def test_eval_section_is_checked_when_the_recipe_loads(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_recipe(tmp_path, section))


def test_missing_task_file_is_named_with_the_recipe_key(tmp_path):
    (tmp_path / "gqa" / "images").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"questions file .*testdev_balanced_questions.json does not exist \(set it with eval.files.questions=PATH\)"):
        load_recipe(_recipe(tmp_path, {"task": "gqa", "data": str(tmp_path / "gqa")}))


def test_malformed_eval_file_fails_before_any_training_step(tmp_path, capsys):
    folder = tmp_path / "gqa"
    _gqa(folder, write_llava_data(tmp_path / "img", per_color=1).parent / "img" / "red0.png")
    (folder / "testdev_balanced_questions.json").write_text(json.dumps({"q0": {"imageId": "1", "question": "q"}}))
    assert main(["train", _recipe(tmp_path, {"task": "gqa", "data": str(folder)})]) == 2
    assert "question q0: missing field 'answer'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "stages").exists()  # nothing trained


def test_run_evaluates_the_recipe_task_and_says_which(tmp_path, capsys):
    folder = tmp_path / "gqa"
    _gqa(folder, write_llava_data(tmp_path / "img", per_color=1).parent / "img" / "red0.png")
    assert main(["train", _recipe(tmp_path, {"task": "gqa", "data": str(folder), "max_new_tokens": 3})]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert record["task"] == "gqa" and record["title"] == "GQA" and record["metric"] == "accuracy" and record["total"] == 2
    assert f"GQA test accuracy: {100 * record['accuracy']:.2f}% (2 questions)" in out
    assert "easy-VQA" not in out
    assert json.loads((tmp_path / "run" / "eval" / "gqa" / "scores.json").read_text())["total"] == 2
    rows = (tmp_path / "run" / "eval" / "gqa" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in rows] == ["q0", "q1"]
