"""Data and config errors name the file, row or key; skip_bad_rows skips and counts; easy-VQA splits stay apart."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import yaml

from conftest import tiny_recipe_dict, write_llava_data
from vlmkit.config import ConfigError, DataConfig, RecipeConfig, apply_overrides, from_dict, load_recipe
from vlmkit.data import load_source
from vlmkit.data.dataset import Collator, ConversationDataset
from vlmkit.data.sources import DataError
from vlmkit.recipes import list_recipes


def rewrite(path, change):
    rows = json.loads(path.read_text())
    change(rows)
    path.write_text(json.dumps(rows))
    return path


def cfg(path, **kw):
    return DataConfig(source="llava_json", path=str(path), **kw)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda rows: rows[2].update(image="img/nothere.png"), r"row 2 \(id 'red-2'\): image file .*nothere.png does not exist"),
        (lambda rows: rows[1].update(conversations=[]), r"row 1 \(id 'red-1'\): 'conversations' is missing or empty"),
        (lambda rows: rows[3]["conversations"][0].update(value="no image here"), r"row 3 .*0 <image> placeholder\(s\) but the row has 1 image"),
        (lambda rows: rows[3]["conversations"][0].update(value="<image><image>"), r"row 3 .*2 <image> placeholder\(s\) but the row has 1 image"),
        (lambda rows: rows[0]["conversations"][1].update({"from": "bot"}), r"row 0 .*'from'='bot'; valid: human, gpt"),
        (lambda rows: rows[0]["conversations"].pop(), r"row 0 .*ends with a human turn"),
    ],
    ids=["missing-image", "empty-conversation", "no-placeholder", "two-placeholders", "bad-role", "no-answer"],
)
def test_bad_rows_are_named(llava_data, change, message, caplog):
    rewrite(llava_data, change)
    with pytest.raises(DataError, match=message) as info:
        load_source(cfg(llava_data))
    assert str(llava_data) in str(info.value)
    caplog.set_level(logging.WARNING, logger="vlmkit")
    result = load_source(cfg(llava_data, skip_bad_rows=True))
    assert len(result.samples) == 15 and len(result.skipped) == 1
    assert "skipped 1 bad row(s)" in caplog.text


def test_unreadable_file_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(cfg(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match=r"bad.json is not valid JSON"):
        load_source(cfg(tmp_path / "bad.json"))
    with pytest.raises(DataError, match="data.path is required"):
        load_source(DataConfig(source="llava_json"))


def test_jsonl_rows_load_like_json(llava_data):
    rows = json.loads(llava_data.read_text())
    jsonl = llava_data.with_suffix(".jsonl")
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    a, b = load_source(cfg(llava_data)), load_source(cfg(jsonl))
    assert [s.images for s in a.samples] == [s.images for s in b.samples]
    assert [s.messages for s in a.samples] == [s.messages for s in b.samples]


def test_corrupt_image_fails_at_encoding_with_row_and_file(llava_data, build_tiny):
    (llava_data.parent / "img" / "blue1.png").write_bytes(b"not a png at all")
    _, processor = build_tiny()
    samples = load_source(cfg(llava_data)).samples
    dataset = ConversationDataset(samples, processor)
    with pytest.raises(DataError, match=r"row 5 \(id 'blue-1'\): image file .*blue1.png could not be decoded.*skip_bad_rows"):
        dataset[5]
    skipping = ConversationDataset(samples, processor, skip_bad_rows=True)
    batch = Collator(processor)([skipping[i] for i in range(4, 8)])
    assert batch["num_skipped"] == 1 and batch["num_samples"] == 3
    assert batch["input_ids"].shape[0] == 3 and batch["pixel_values"].shape[0] == 3


def test_too_long_sample_names_row_and_limit(llava_data, build_tiny):
    rewrite(llava_data, lambda rows: rows[4]["conversations"][1].update(value="blue " * 300))
    _, processor = build_tiny(max_length=64)
    dataset = ConversationDataset(load_source(cfg(llava_data)).samples, processor)
    with pytest.raises(DataError, match=r"row 4 \(id 'blue-0'\).*max_length=64"):
        dataset[4]
    assert ConversationDataset(dataset.samples, processor, skip_bad_rows=True)[4] is None


def test_image_folder_option(tmp_path):
    path = write_llava_data(tmp_path / "d")
    moved = tmp_path / "json" / "data.json"
    moved.parent.mkdir()
    path.rename(moved)
    with pytest.raises(DataError, match="does not exist"):
        load_source(cfg(moved))
    assert len(load_source(cfg(moved, image_folder=str(tmp_path / "d"))).samples) == 16


# ------------------------------------------------------------------------------------------- config

def test_unknown_config_key_names_key_and_valid_keys(tmp_path, llava_data):
    data = tiny_recipe_dict(llava_data, tmp_path / "out")
    data["stages"][0]["data"]["skip_bad_row"] = True
    with pytest.raises(ConfigError, match=r"unknown config key 'stages\.0\.data\.skip_bad_row'.*skip_bad_rows") as info:
        from_dict(RecipeConfig, data)
    assert "valid keys here" in str(info.value)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=f"{path}: unknown config key"):
        load_recipe(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.sed=3", r"unknown config key 'train.sed'; valid keys here: seed"),
        ("stages.nope.lr=1", r"no item named 'nope'; names: align, instruct"),
        ("stages.align.policy.vision=half", r"stages.align.policy.vision='half' is not valid; choose one of 'frozen', 'full', 'lora'"),
        ("train.precision=fp8", r"train.precision='fp8' is not valid; choose one of 'fp32', 'bf16'"),
        ("stages.align.policy.eyes=full", r"unknown part\(s\) \['eyes'\]; valid parts: vision, connector, fusion, language"),
        ("train.seed", r"must look like key.path=value"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("easyvqa-tiny", [override])


def test_overrides_by_stage_name_and_index_and_flow_maps():
    r = load_recipe("easyvqa-tiny", ["stages.align.lr=0.5", "stages.1.batch_size=7", "stages.instruct.lr_scale={vision: 3}",
                                     "model.connector.options.merge=1", "train.seed=9"])
    assert r.stage("align").lr == 0.5 and r.stages[1].batch_size == 7
    assert r.stage("instruct").lr_scale == {"vision": 3} and r.model.connector.options == {"merge": 1} and r.train.seed == 9
    raw = {"stages": [{"name": "a"}]}
    assert apply_overrides(raw, ["stages.a.epochs=2"]) == {"stages": [{"name": "a", "epochs": 2}]}
    assert raw == {"stages": [{"name": "a"}]}  # input untouched


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates(name):
    r = load_recipe(name)
    assert r.stages and r.name == name


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match="shipped: .*easyvqa-tiny"):
        load_recipe("easyvqa-huge")


# ------------------------------------------------------------------------------------------- easy-VQA

needs_easyvqa = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="the easy-vqa package is not installed")


@needs_easyvqa
def test_easyvqa_splits_are_disjoint_and_complete():
    from vlmkit.data.easyvqa import load_questions

    train, test = load_questions("train"), load_questions("test")
    assert len(train) == 38575 and len(test) == 9673
    assert len({q.image_path for q in train}) == 4000 and len({q.image_path for q in test}) == 1000
    assert not {q.image_path for q in train} & {q.image_path for q in test}
    with pytest.raises(DataError, match="split 'val' does not exist; valid: train, test"):
        load_questions("val")


@needs_easyvqa
def test_easyvqa_captions_are_consistent_with_every_question():
    from vlmkit.data.easyvqa import COLORS, SHAPES, derive_facts, load_questions

    qs = load_questions("train")
    facts = derive_facts(qs)
    full = [i for i, f in facts.items() if "color" in f and "shape" in f]
    assert len(full) > 0.85 * 4000  # 3,578 of 4,000
    for q in qs:
        f = facts.get(q.image_id, {})
        if q.answer in COLORS:
            assert f.get("color") == q.answer
        if q.answer in SHAPES:
            assert f.get("shape") == q.answer


@needs_easyvqa
def test_easyvqa_sources_keep_splits_and_group_turns():
    captions = load_source(DataConfig(source="easyvqa", split="train", kind="captions"))
    assert captions.samples[0].messages[1].content.count(" ") == 2  # " blue circle"
    qa = load_source(DataConfig(source="easyvqa", split="test", kind="qa", turns_per_conversation=5))
    assert sum(len(s.messages) // 2 for s in qa.samples) == 9673
    assert all(len(s.messages) <= 10 and s.messages[0].content.startswith("<image>\n") for s in qa.samples)
    assert all("<image>" not in m.content for s in qa.samples for m in s.messages[1:])
    assert {s.images[0] for s in qa.samples}.isdisjoint({s.images[0] for s in captions.samples})


def test_recipe_base_with_overrides(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("name: child\nbase: easyvqa-tiny\noverrides:\n  - stages.align.lr=0.25\n  - train.seed=7\n")
    r = load_recipe(child)
    base = load_recipe("easyvqa-tiny")
    assert r.name == "child" and r.stage("align").lr == 0.25 and r.train.seed == 7
    assert r.stage("instruct") == base.stage("instruct") and r.model == base.model
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"name: loop\nbase: {loop}\n")
    with pytest.raises(ConfigError, match="recipe bases form a cycle"):
        load_recipe(loop)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbase: easyvqa-tiny\noverrides: {train.seed: 3}\n")
    with pytest.raises(ConfigError, match="'overrides' must be a list of key.path=value strings"):
        load_recipe(bad)


@needs_easyvqa
def test_easyvqa_caption_orders():
    from vlmkit.data.easyvqa import COLORS, SHAPES

    one = load_source(DataConfig(source="easyvqa", split="test", kind="captions"))
    flipped = load_source(DataConfig(source="easyvqa", split="test", kind="captions", caption_order="shape-color"))
    both = load_source(DataConfig(source="easyvqa", split="test", kind="captions", caption_order="both"))
    first = [s.messages[1].content for s in one.samples]
    assert all(c.startswith(" ") and c.split()[0] in COLORS and c.split()[1] in SHAPES for c in first)
    assert [s.messages[1].content for s in flipped.samples] == [" " + " ".join(c.split()[::-1]) for c in first]
    assert len(both.samples) == 2 * len(one.samples)
    assert [s.messages[1].content for s in both.samples[::2]] == first
    assert [s.messages[1].content for s in both.samples[1::2]] == [s.messages[1].content for s in flipped.samples]
    assert both.samples[0].images == both.samples[1].images and both.samples[1].origin.endswith("caption 1")
    with pytest.raises(ConfigError, match="data.caption_order"):
        DataConfig(source="easyvqa", kind="captions", caption_order="random")
