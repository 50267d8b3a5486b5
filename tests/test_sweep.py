"""Design-space sweeps: grid parsing (aliases, dotted keys, errors), the product order, connector options
when the grid switches the connector type, every variant built before any trains (all failures at once),
and two-variant sweeps of the easy-VQA recipe on a very short schedule (table, sweep.json/csv, chart,
resuming; two connector types)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from vlmkit.cli import main
from vlmkit.config import ConfigError, load_recipe, to_dict
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


def test_switching_the_connector_type_drops_the_recipe_options(tmp_path):
    # easyvqa-tiny's connector is mlp2x_gelu with merge: 2 and (here) stage-1 weights: both belong to that type
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(load_recipe("easyvqa-tiny", ["model.connector.pretrained=stage1/connector.safetensors"]))))
    _, planned = plan_sweep(recipe, ["connector=linear,qformer"], [], tmp_path / "sweep")
    assert [(c.model.connector.type, c.model.connector.options, c.model.connector.pretrained) for _, c in planned] == [
        ("linear", {}, None), ("qformer", {}, None)]
    _, planned = plan_sweep("easyvqa-tiny", ["connector=mlp2x_gelu,qformer"], [], tmp_path / "sweep")
    assert [c.model.connector.options for _, c in planned] == [{"merge": 2}, {}]  # the recipe's own type keeps them


def test_options_from_the_grid_or_command_line_apply_to_every_type(tmp_path):
    _, planned = plan_sweep("easyvqa-tiny", ["connector=linear,mlp2x_gelu merge=1,2"], [], tmp_path)
    assert [c.model.connector.options for _, c in planned] == [{"merge": 1}, {"merge": 2}, {"merge": 1}, {"merge": 2}]
    _, planned = plan_sweep("easyvqa-tiny", ["connector=linear,qformer"], ["model.connector.options={}"], tmp_path)
    assert [c.model.connector.options for _, c in planned] == [{}, {}]
    # written explicitly, an option is never dropped silently: the type that does not take it is reported
    with pytest.raises(ConfigError) as info:
        plan_sweep("easyvqa-tiny", ["connector=qformer,resampler"], ["model.connector.options.num_queries=8"], tmp_path)
    assert "1 of 2 sweep variants" in str(info.value)
    assert "--grid connector=resampler: the model cannot be built" in str(info.value) and "num_queries" in str(info.value)


def test_every_unbuildable_variant_is_reported_at_once(tmp_path):
    # 32 px gives the tiny BiT tower a 1x1 grid that merge=2 cannot fuse; qformer takes no merge option at all
    with pytest.raises(ConfigError) as info:
        plan_sweep("easyvqa-tiny", ["connector=linear,qformer merge=2 image_size=32,64"], [], tmp_path / "sweep")
    message = str(info.value)
    assert message.startswith("3 of 4 sweep variants fail before training; nothing was trained")
    failing = [line.split(": ")[0].strip() for line in message.splitlines()[1:]]
    assert failing == ["--grid connector=linear,merge=2,image_size=32", "--grid connector=qformer,merge=2,image_size=32",
                       "--grid connector=qformer,merge=2,image_size=64"]
    assert "merge=2 needs a square token grid" in message and "unexpected keyword argument 'merge'" in message
    assert not (tmp_path / "sweep").exists()


def test_unbuildable_variant_fails_the_sweep_before_any_trains(tmp_path, capsys, monkeypatch):
    # the audit's grid: the recipe's merge: 2 no longer leaks into qformer or ldp, and the one variant
    # that cannot be built (mlp2x_gelu with merge 2 on a 1x1 grid) is named before anything trains
    def no_training(config):
        raise AssertionError(f"{config.train.output_dir} was trained although a variant cannot be built")

    monkeypatch.setattr("vlmkit.training.run.run_training", no_training)
    out = tmp_path / "sweep"
    assert main(["sweep", "easyvqa-tiny", "--grid", "connector=mlp2x_gelu,qformer,ldp", "--grid", "image_size=32,64",
                 "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.split("vlmkit sweep: error: ", 1)[1]  # the log above it lists the variants that build
    assert err.startswith("1 of 6 sweep variants fail before training; nothing was trained")
    assert "--grid connector=mlp2x_gelu,image_size=32: the model cannot be built: connector option merge=2" in err
    assert "qformer" not in err and "ldp" not in err
    assert not out.exists()


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
    from vlmkit.formats import load_model

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


@pytest.mark.slow
def test_sweep_over_connector_types_trains_each(tmp_path, capsys, keep_torch_threads):
    pytest.importorskip("easy_vqa")
    out = tmp_path / "sweep"
    assert main(["sweep", "easyvqa-tiny", "--grid", "connector=mlp2x_gelu,qformer", *SHORT, "--output-dir", str(out)]) == 0
    table = {cells[0]: cells for cells in (line.split() for line in capsys.readouterr().out.splitlines())
             if cells and cells[0].startswith("connector=")}
    assert table["connector=mlp2x_gelu"][1] == "1" and table["connector=qformer"][1] == "32"  # merged 2x2 grid; 32 queries
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["variant"], r["visual_tokens"], r["reused"]) for r in rows] == [("connector=mlp2x_gelu", 1, False),
                                                                              ("connector=qformer", 32, False)]
    for r in rows:
        assert r["train_seconds"] > 0 and r["total"] == 32 and 0 <= r["accuracy"] <= 1
        assert [p.parent.name for p in sorted((out / r["variant"] / "stages").glob("*/stage.json"))] == ["align", "instruct"]
    saved = yaml.safe_load((out / "connector=qformer" / "config.yaml").read_text())
    assert saved["model"]["connector"] == {"type": "qformer", "options": {}, "pretrained": None}


def test_sweep_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlmkit sweep") and "--grid KEY=V1,V2" in out and "image_size" in out
