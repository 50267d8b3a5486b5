"""Design-space sweeps: grid parsing (aliases, dotted keys, errors), the product order, and a two-variant
sweep of the easy-VQA recipe on a very short schedule (table, sweep.json/csv, chart, resuming)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from vlmkit.cli import main
from vlmkit.config import ConfigError
from vlmkit.training.sweep import GRID_ALIASES, GridAxis, Variant, expand_grid, parse_grid, plan_sweep, variant_overrides


def test_grid_aliases_and_dotted_keys():
    axes = parse_grid(["connector=linear,mlp2x_gelu", "image_size=32,64 stages.instruct.epochs=1", "lr=1e-3"])
    assert [a.name for a in axes] == ["connector", "image_size", "stages.instruct.epochs", "lr"]
    assert axes[0] == GridAxis("connector", ("linear", "mlp2x_gelu"), ("model.connector.type",))
    assert axes[1].keys == ("model.vision.image_size",) and axes[1].values == ("32", "64")
    assert axes[2].keys == ("stages.instruct.epochs",) and axes[2].values == ("1",)
    assert axes[3].keys == GRID_ALIASES["lr"] == ("stages.*.lr",)


def test_grid_values_keep_brackets_whole():
    (axis,) = parse_grid(["model.vision.image_mean=[0.5,0.5,0.5],[0.4,0.4,0.4]"])
    assert axis.values == ("[0.5,0.5,0.5]", "[0.4,0.4,0.4]")


@pytest.mark.parametrize("spec, message", [
    ("connector", "--grid 'connector' must look like key=value1,value2"),
    ("=linear", "has an empty key or value"),
    ("connector=linear,", "has an empty key or value"),
    ("merge=1 merge=2", "--grid key 'merge' is given twice"),
])
def test_bad_grid_syntax_is_a_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid([spec])


def test_product_order_first_axis_outermost():
    variants = expand_grid(parse_grid(["connector=linear,mlp2x_gelu", "image_size=32,64"]))
    assert [v.name for v in variants] == ["connector=linear,image_size=32", "connector=linear,image_size=64",
                                          "connector=mlp2x_gelu,image_size=32", "connector=mlp2x_gelu,image_size=64"]
    assert Variant((("model.connector.options", "{merge: 2}"),)).folder_name == "model.connector.options=_merge__2_"


def test_variant_overrides_resolve_aliases_and_every_stage():
    axes = parse_grid(["lr=5e-4", "merge=2"])
    (variant,) = expand_grid(axes)
    assert variant_overrides(variant, axes, ["align", "instruct"]) == [
        "stages.align.lr=5e-4", "stages.instruct.lr=5e-4", "model.connector.options.merge=2"]


def test_plan_resolves_each_variant_config(tmp_path):
    out, planned = plan_sweep("easyvqa-tiny", ["connector=linear,mlp2x_gelu", "lr=2e-3", "stages.align.epochs=1"],
                              ["train.seed=7"], tmp_path / "sweep")
    assert out == tmp_path / "sweep" and len(planned) == 2
    variant, config = planned[0]
    assert variant.name == "connector=linear,lr=2e-3,stages.align.epochs=1"
    assert config.model.connector.type == "linear" and planned[1][1].model.connector.type == "mlp2x_gelu"
    assert [s.lr for s in config.stages] == [2e-3, 2e-3] and config.stages[0].epochs == 1.0
    assert config.train.seed == 7 and config.train.output_dir == str(out / variant.folder_name)


@pytest.mark.parametrize("spec, named", [("conector=linear,mlp2x_gelu", "unknown config key 'conector'"),
                                         ("model.vision.imagesize=32", "unknown config key 'model.vision.imagesize'"),
                                         ("connector=linear,nope", "unknown connector 'nope'")])
def test_unknown_key_or_id_names_it_and_the_grid(tmp_path, spec, named):
    with pytest.raises(ConfigError) as info:
        plan_sweep("easyvqa-tiny", [spec], [], tmp_path)
    assert named in str(info.value) and "--grid" in str(info.value) and "grid aliases: connector" in str(info.value)
    assert not tmp_path.joinpath("sweep.json").exists()


def test_recipe_without_eval_is_refused_before_training(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "data.json", tmp_path / "run")))
    assert main(["sweep", str(path), "--grid", "merge=1,2", "--output-dir", str(tmp_path / "sweep")]) == 2
    assert "has no eval section" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


# one torch thread: on a busy 2-core machine two threads that wait on each other made this test 5x slower
SHORT = ["stages.align.data.limit=128", "stages.align.max_steps=3", "stages.align.batch_size=16",
         "stages.instruct.data.limit=128", "stages.instruct.max_steps=3", "stages.instruct.batch_size=8",
         "eval.limit=32", "train.progress=false", "train.threads=1"]


@pytest.fixture
def keep_torch_threads():
    """``train.threads`` sets torch's thread count for the process; put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sweep_trains_each_variant_then_reuses_them(tmp_path, capsys, monkeypatch, keep_torch_threads):
    pytest.importorskip("easy_vqa")
    out = tmp_path / "sweep"
    # overrides after --grid too: argparse leaves them over and main() hands them to the command
    assert main(["sweep", "easyvqa-tiny", SHORT[0], "--grid", "merge=1,2", *SHORT[1:], "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = [line.split() for line in printed.splitlines()]
    assert ["variant", "visual", "tokens", "parameters", "train", "time", "accuracy"] in lines
    table = {cells[0]: cells for cells in lines if cells and cells[0].startswith("merge=")}
    assert table["merge=1"][1] == "4" and table["merge=2"][1] == "1"  # a 2x2 BiT grid; merge=2 fuses it into one token

    rows = json.loads((out / "sweep.json").read_text())
    assert [r["variant"] for r in rows] == ["merge=1", "merge=2"] and [r["settings"] for r in rows] == [{"merge": 1}, {"merge": 2}]
    assert [r["visual_tokens"] for r in rows] == [4, 1] and not any(r["reused"] for r in rows)
    assert rows[0]["parameters"] < rows[1]["parameters"]  # merge=2 widens the connector's input 4x
    from vlmkit.models.build import load_model

    model, _ = load_model(out / "merge=2" / "model")
    assert rows[1]["parameters"] == sum(p.numel() for p in model.parameters())
    for r in rows:
        assert r["total"] == 32 and 0 <= r["accuracy"] <= 1 and r["train_seconds"] > 0
        assert table[r["variant"]][2] == f"{r['parameters']:,}" and table[r["variant"]][-1] == f"{100 * r['accuracy']:.2f}%"
        saved = yaml.safe_load((out / r["variant"] / "config.yaml").read_text())
        assert saved["model"]["connector"]["options"]["merge"] == r["settings"]["merge"]
        assert saved["stages"][0]["max_steps"] == 3 and saved["eval"]["limit"] == 32
    with (out / "sweep.csv").open() as fh:
        assert [(r["variant"], r["merge"], r["visual_tokens"]) for r in csv.DictReader(fh)] == [("merge=1", "1", "4"), ("merge=2", "2", "1")]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_training(config):
        raise AssertionError(f"{config.train.output_dir} was trained again")

    monkeypatch.setattr("vlmkit.training.run.run_training", no_training)
    assert main(["sweep", "easyvqa-tiny", "--grid", "merge=1,2", *SHORT, "--output-dir", str(out)]) == 0
    assert capsys.readouterr().out.count("(reused)") == 2
    again = json.loads((out / "sweep.json").read_text())
    assert all(r["reused"] for r in again)
    assert [{k: v for k, v in r.items() if k != "reused"} for r in again] == [{k: v for k, v in r.items() if k != "reused"} for r in rows]


def test_sweep_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlmkit sweep") and "--grid KEY=V1,V2" in out and "image_size" in out
