"""The command line and the Python API on a small trained model: --help everywhere, list, chat, REPL, eval."""

from __future__ import annotations

import io
import json
import runpy
import sys

import pytest

import vlmkit
from conftest import COLOR_NAMES, check_quality, tiny_recipe_dict, write_llava_data
from vlmkit.cli import LISTS, build_parser, main
from vlmkit.config import RecipeConfig, from_dict
from vlmkit.inference.chat import run_repl
from vlmkit.training.run import run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained (60 steps) to name the colour of an image; returns (model folder, data folder)."""
    root = tmp_path_factory.mktemp("cli")
    data = write_llava_data(root / "data")
    stages = [{"name": "sft", "policy": {"vision": "full", "connector": "full", "language": "full"},
               "data": {"source": "llava_json", "path": str(data)}, "max_steps": 60, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.1}]
    summary = run_training(from_dict(RecipeConfig, tiny_recipe_dict(data, root / "run", stages)))
    return summary.model_dir, data.parent


COMMANDS = ["train", "demo", "eval", "chat", "list"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"] if command else ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlmkit" + (f" {command}" if command else ""))
    if command is None:
        assert all(c in out for c in COMMANDS)


def test_python_dash_m_runs_the_same_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vlmkit", "list", "templates"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("vlmkit", run_name="__main__")
    assert info.value.code == 0
    assert "vicuna_v1" in capsys.readouterr().out


@pytest.mark.parametrize("what", sorted(LISTS))
def test_list_prints_every_registry_entry(what, capsys):
    assert main(["list", what]) == 0
    out = capsys.readouterr().out
    expected = {"encoders": ["clip", "siglip", "resnet", "convnext"], "connectors": ["linear", "mlp2x_gelu"],
                "backbones": ["llama", "qwen2", "phi"], "templates": ["plain", "vicuna_v1", "llama3", "chatml", "tokenizer"],
                "recipes": ["easyvqa-tiny"], "formats": ["vlmkit", "hf-llava", "hf-blip2", "llava-original"],
                "strategies": ["none", "ddp", "fsdp", "deepspeed"], "deepspeed": ["zero2", "zero3", "zero3-offload"]}[what]
    first_column = {line.split()[0] for line in out.splitlines()[2:] if line.strip()}
    assert set(expected) <= first_column
    if what == "backbones":  # every family, with its kind, typical sizes and the models built on it
        from vlmkit.models.language import BACKBONES

        header = out.splitlines()[0]
        assert "family" in header and "kind" in header and "sizes" in header and "used by" in header
        rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
        assert set(BACKBONES.names()) == set(rows)
        for name, spec in BACKBONES.items():
            assert spec.kind in rows[name].split() and spec.sizes and spec.used_by, name
            assert spec.sizes in rows[name] and spec.used_by in rows[name], name
        assert "any other AutoModelForCausalLM" in rows["causal_lm"]
    if what == "encoders":
        from vlmkit.models.vision import VISION_TOWERS

        assert set(VISION_TOWERS.names()) <= first_column and "automodel" in first_column


def test_unknown_list_is_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["list", "towers"])
    assert "invalid choice: 'towers'" in capsys.readouterr().err


def test_chat_answers_about_an_image(trained, capsys):
    model_dir, data = trained
    pipe = vlmkit.load(str(model_dir))
    # measured on seeds 0-2 x kernel paths AVX-512 / AVX2 / default, 1 thread (bench/test_quality.py, 9 runs): 16/16 in every run; bound 0.9 (at most one wrong)
    named = [pipe.chat(str(data / "img" / f"{c}{k}.png"), "what color is the image?") == c for c in COLOR_NAMES for k in range(4)]
    check_quality("cli fixture: colours named right of its 16 training images", sum(named) / len(named), above=0.9)
    expected = pipe.chat(str(data / "img" / "red1.png"), "what color is the image?")
    assert main(["chat", "--model", str(model_dir), "--image", str(data / "img" / "red1.png"), "what", "color", "is", "the", "image?"]) == 0
    assert capsys.readouterr().out.strip() == expected
    blue = str(data / "img" / "blue2.png")
    assert pipe.chat(blue, "what color is the image?", use_cache=False) == pipe.chat(blue, "what color is the image?")


def test_repl_keeps_history_and_switches_images(trained):
    model_dir, data = trained
    pipe = vlmkit.load(str(model_dir))
    expected = [pipe.chat(str(data / "img" / f), "what color is the image?", max_new_tokens=4) for f in ("green1.png", "yellow3.png")]
    lines = ["what color is the image?", "/help", f"/image {data / 'img' / 'yellow3.png'}", "what color is the image?",
             "what color is the image?", "/image /no/such.png", "/reset", "/quit", "never read"]
    out = io.StringIO()
    assert run_repl(pipe, str(data / "img" / "green1.png"), {"max_new_tokens": 4}, io.StringIO("\n".join(lines) + "\n"), out) == 0
    answers = [line.split("> ", 1)[1] for line in out.getvalue().splitlines() if line.startswith("assistant> ")]
    assert answers[:2] == expected and len(answers) == 3  # the third turn runs with history
    text = out.getvalue()
    assert "commands: /image" in text and "error: image file /no/such.png does not exist" in text and "(conversation cleared)" in text


def test_cli_errors_exit_2_with_message(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path), "hi"]) == 2
    assert "is not a model folder of a known layout" in capsys.readouterr().err
    assert main(["train", "easyvqa-tiny", "train.sed=1"]) == 2
    assert "unknown config key 'train.sed'" in capsys.readouterr().err


def test_train_command_writes_resolved_config(tmp_path, capsys):
    data = write_llava_data(tmp_path / "data", per_color=1)
    import yaml

    recipe = tiny_recipe_dict(data, tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "stages.align.max_steps=2", "stages.instruct.max_steps=1"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["stages"][0]["max_steps"] == 2 and saved["stages"][1]["max_steps"] == 1
    out = capsys.readouterr().out
    assert "stage align" in out and "model:" in out
    # a second call reuses both finished stages
    assert main(["train", str(tmp_path / "r.yaml"), "stages.align.max_steps=2", "stages.instruct.max_steps=1"]) == 0
    assert capsys.readouterr().out.count("(reused from disk)") == 2
    assert json.loads((tmp_path / "run" / "stages" / "align" / "stage.json").read_text())["steps"] == 2
