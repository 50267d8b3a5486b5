"""The bad-input corpus (``bad_inputs.py``: 37 kinds of images, 19 kinds of bad rows) through every entry
point that reads them: ``load_image`` + transforms, ``vlmkit chat`` (one shot and the REPL), training
data (``vlmkit train``, the dataset with and without ``skip_bad_rows``) and evaluation data
(``vlmkit eval``). Valid oddities are read as RGB; broken or unsafe files end in one clear error that
names the file (and the row or question), never in a traceback."""

from __future__ import annotations

import io
import json
import re

import pytest
import yaml

from bad_inputs import BAD_IMAGES, GOOD_IMAGES, IMAGES, ROWS, write_images
from conftest import tiny_model_config, tiny_recipe_dict, write_llava_data
from vlmkit.cli import main
from vlmkit.data import ConversationDataset, load_source
from vlmkit.data.dataset import Collator
from vlmkit.data.sources import SOURCES, DataError
from vlmkit.config import DataConfig
from vlmkit.processing.image import ImageError, ImageTransform, load_image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_tokenizer):
    """An untrained tiny model saved as a model folder (these tests need a model that runs, not one that knows)."""
    import copy

    import torch

    from vlmkit.models.build import build_model
    from vlmkit.formats import save_model

    torch.manual_seed(0)
    cfg = tiny_model_config(encoder="bit", connector_options={"merge": 1})
    model, processor = build_model(cfg, tokenizer=copy.deepcopy(bpe_tokenizer))
    return save_model(model, processor, cfg, tmp_path_factory.mktemp("model") / "m")


def test_corpus_has_at_least_thirty_kinds():
    assert len(IMAGES) + len(ROWS) >= 30 and len(BAD_IMAGES) >= 12 and len(GOOD_IMAGES) >= 15


@pytest.mark.parametrize("kind", list(IMAGES))
def test_load_image_reads_valid_oddities_and_names_broken_files(kind, corpus):
    path = corpus[kind]
    if IMAGES[kind][1]:
        img = load_image(path)
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
        for aspect in ("crop", "pad"):
            pixels = ImageTransform(32, (0.5,) * 3, (0.5,) * 3, aspect)(img)
            assert tuple(pixels.shape) == (3, 32, 32) and bool(pixels.isfinite().all())
    else:
        with pytest.raises(ImageError) as info:
            load_image(path)
        assert str(path) in str(info.value)


def test_exif_orientation_and_bomb_refused_before_decoding(corpus, monkeypatch):
    assert load_image(corpus["exif-rotated-jpeg"]).size == (40, 48)  # saved 48x40 with "rotate 90"
    with pytest.raises(ImageError, match=r"60000x60000 = 3,600,000,000 pixels|too large"):
        load_image(corpus["decompression-bomb-header"])
    # the limit is ours to set: a 48x40 image is refused under a 1,000-pixel limit, with the numbers
    with pytest.raises(ImageError, match=r"48x40 = 1,920 pixels, more than the limit of 1,000"):
        load_image(corpus["rgb-png"], max_pixels=1000)
    monkeypatch.setattr("vlmkit.processing.image.MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="more than the limit of 1,000"):
        load_image(corpus["rgb-png"])


def test_strips_never_build_a_huge_intermediate(corpus):
    """A 20000x1 strip resized by its short side would be 1.28M x 64 pixels; only the crop window is resampled."""
    strip = load_image(corpus["wide-strip-20000x1"])
    crop = ImageTransform(64, (0.5,) * 3, (0.5,) * 3, "crop").geometry(strip)
    pad = ImageTransform(64, (0.5,) * 3, (0.5,) * 3, "pad").geometry(strip)
    assert crop.size == pad.size == (64, 64)


# ---------------------------------------------------------------------------------------------
# vlmkit chat

@pytest.mark.parametrize("kind", list(IMAGES))
def test_chat_command(kind, corpus, model_dir, capsys):
    code = main(["chat", "--model", str(model_dir), "--image", str(corpus[kind]), "--max-new-tokens", "2", "what", "is", "it?"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if IMAGES[kind][1]:
        assert code == 0, err
    else:
        assert code == 2 and err.startswith("vlmkit chat: error: image ") and str(corpus[kind]) in err, err


def test_chat_repl_reports_bad_images_and_continues(corpus, model_dir):
    import vlmkit
    from vlmkit.inference.chat import run_repl

    pipe = vlmkit.load(str(model_dir))
    lines = [f"/image {corpus[k]}" for k in BAD_IMAGES] + [f"/image {corpus['cmyk-jpeg']}", "what is it?", "/quit"]
    out = io.StringIO()
    assert run_repl(pipe, None, {"max_new_tokens": 2}, io.StringIO("\n".join(lines) + "\n"), out) == 0
    text = out.getvalue()
    assert text.count("error: image ") == len(BAD_IMAGES)
    assert all(str(corpus[k]) in text for k in BAD_IMAGES)
    assert "assistant> " in text  # the session went on with the good image


# ---------------------------------------------------------------------------------------------
# training data

def _corpus_data(tmp_path, corpus) -> tuple:
    """A LLaVA JSON with one row per corpus image, ids = the kinds."""
    rows = [{"id": kind, "image": str(path), "conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                                                                  {"from": "gpt", "value": "red"}]}
            for kind, path in corpus.items() if kind not in ("missing-file", "directory-named-like-an-image")]
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(rows))
    return path, rows


def test_training_rows_with_bad_images_are_named_or_counted(tmp_path, corpus, build_tiny):
    path, rows = _corpus_data(tmp_path, corpus)
    _, processor = build_tiny()
    samples = load_source(DataConfig(source="llava_json", path=str(path))).samples
    strict = ConversationDataset(samples, processor)
    skipping = ConversationDataset(samples, processor, skip_bad_rows=True)
    for i, row in enumerate(rows):
        if IMAGES[row["id"]][1]:
            assert strict[i].pixel_values.shape == (1, 3, 32, 32), row["id"]
            continue
        with pytest.raises(DataError) as info:
            strict[i]
        message = str(info.value)
        assert f"row {i} (id {row['id']!r})" in message and row["image"] in message and "skip_bad_rows" in message
        assert skipping[i] is None
    batch = Collator(processor)([skipping[i] for i in range(len(rows))])
    bad = sum(not IMAGES[r["id"]][1] for r in rows)
    assert batch["num_skipped"] == bad and batch["num_samples"] == len(rows) - bad


def test_missing_and_directory_images_are_found_when_the_data_loads(tmp_path, corpus):
    for kind, problem in (("missing-file", "does not exist"), ("directory-named-like-an-image", "is not a file")):
        rows = [{"id": kind, "image": str(corpus[kind]), "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                           {"from": "gpt", "value": "a"}]}]
        (tmp_path / "d.json").write_text(json.dumps(rows))
        with pytest.raises(DataError, match=rf"row 0 \(id '{kind}'\): image file .*{kind}.png {problem}"):
            load_source(DataConfig(source="llava_json", path=str(tmp_path / "d.json")))


FILE_PROBLEMS = ("non-utf8-json", "empty-file", "top-level-object")


def _train_cli(tmp_path, data_path, capsys, skip: bool = False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tiny_recipe_dict(data_path, tmp_path / "run", [
        {"name": "sft", "policy": {"connector": "full"}, "max_steps": 2, "batch_size": 64, "lr": 1e-3,
         "data": {"source": "llava_json", "path": str(data_path), "skip_bad_rows": skip}}])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code = main(["train", str(tmp_path / "r.yaml")])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_train_command_on_the_image_corpus(tmp_path, corpus, capsys, caplog):
    path, rows = _corpus_data(tmp_path, corpus)
    code, _, err = _train_cli(tmp_path / "strict", path, capsys)
    named = re.search(r"row (\d+) \(id '([^']+)'\): image file (\S+) ", err)
    assert code == 2 and named and "skip_bad_rows" in err, err  # the batches are shuffled: whichever bad row comes first
    row, kind, file = int(named.group(1)), named.group(2), named.group(3)
    assert not IMAGES[kind][1] and rows[row]["id"] == kind and file == str(corpus[kind])
    code, _, err = _train_cli(tmp_path / "skip", path, capsys, skip=True)
    assert code == 0, err
    log = (tmp_path / "skip" / "run" / "train.log").read_text()
    bad = sum(not IMAGES[r["id"]][1] for r in rows)
    assert f"skipped {2 * bad} bad sample(s)" in log  # every bad row in each of the 2 steps (one batch = all rows)


@pytest.mark.parametrize("kind", list(ROWS))
def test_bad_data_files_and_rows(kind, tmp_path, capsys):
    name, content, message = ROWS[kind]
    folder = tmp_path / "data"
    folder.mkdir()
    write_llava_data(folder / "images", per_color=1)
    (folder / "ok.png").write_bytes((folder / "images" / "img" / "red0.png").read_bytes())
    path = folder / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_source(DataConfig(source="llava_json", path=str(path)))
    assert message in str(info.value) and str(path) in str(info.value)
    code, _, err = _train_cli(tmp_path, path, capsys)
    assert code == 2 and message in err and str(path) in err, err
    if kind not in FILE_PROBLEMS:  # a bad row, not a bad file: skipped and counted with skip_bad_rows
        result = SOURCES.get("llava_json")(DataConfig(source="llava_json", path=str(path), skip_bad_rows=True))
        assert len(result.skipped) == 1 and message in result.skipped[0]


def test_skipped_rows_are_counted_beside_good_ones(tmp_path, caplog):
    import logging

    data = write_llava_data(tmp_path / "d", per_color=1)
    rows = json.loads(data.read_text())
    bad = [None, [1], {"id": "x", "conversations": "hi"}, {"image": 5, "conversations": rows[0]["conversations"]}]
    jsonl = data.with_suffix(".jsonl")
    jsonl.write_text("\n".join([*(json.dumps(r) for r in rows + bad), "{not json"]) + "\n")
    caplog.set_level(logging.WARNING, logger="vlmkit")
    result = load_source(DataConfig(source="llava_json", path=str(jsonl), skip_bad_rows=True))
    assert len(result.samples) == len(rows) and len(result.skipped) == len(bad) + 1
    assert f"line {len(rows) + len(bad) + 1}: not valid JSON" in result.skipped[-1]
    assert f"skipped {len(bad) + 1} bad row(s)" in caplog.text


# ---------------------------------------------------------------------------------------------
# evaluation data

def _gqa(folder, images: dict[str, bytes | None]) -> None:
    """A GQA-format folder: one question per image id."""
    (folder / "images").mkdir(parents=True)
    questions = {}
    for n, (image_id, data) in enumerate(images.items()):
        if data is not None:
            (folder / "images" / f"{image_id}.jpg").write_bytes(data)
        questions[f"q{n}"] = {"imageId": image_id, "question": "what is it?", "answer": "red"}
    (folder / "testdev_balanced_questions.json").write_text(json.dumps(questions))


def test_eval_command_reads_every_valid_oddity(tmp_path, corpus, model_dir, capsys):
    _gqa(tmp_path / "gqa", {kind: corpus[kind].read_bytes() for kind in GOOD_IMAGES})
    code = main(["eval", "--model", str(model_dir), "--task", "gqa", "--data", str(tmp_path / "gqa"), "--max-new-tokens", "2",
                 "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in out + err, err
    assert json.loads((tmp_path / "out" / "gqa" / "scores.json").read_text())["total"] == len(GOOD_IMAGES)


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_eval_command_names_the_question_and_the_image(kind, tmp_path, corpus, model_dir, capsys):
    data = None if kind == "missing-file" else b"" if kind == "directory-named-like-an-image" else corpus[kind].read_bytes()
    _gqa(tmp_path / "gqa", {"good": corpus["rgb-png"].read_bytes(), kind: data})
    if kind == "directory-named-like-an-image":
        (tmp_path / "gqa" / "images" / f"{kind}.jpg").unlink()
        (tmp_path / "gqa" / "images" / f"{kind}.jpg").mkdir()
    code = main(["eval", "--model", str(model_dir), "--task", "gqa", "--data", str(tmp_path / "gqa"), "--batch-size", "1",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err, err
    assert "q1" in err and f"{kind}.jpg" in err, err
    # the question before the bad one was answered and saved: a rerun after fixing the file resumes
    if kind not in ("missing-file", "directory-named-like-an-image"):  # those are found before the model loads
        rows = (tmp_path / "out" / "gqa" / "predictions.jsonl").read_text().splitlines()
        assert [json.loads(r)["id"] for r in rows] == ["q0"]


def test_bad_eval_files_are_named(tmp_path, model_dir, capsys):
    folder = tmp_path / "gqa"
    (folder / "images").mkdir(parents=True)
    (folder / "testdev_balanced_questions.json").write_bytes('{"q0": {"question": "caf\xe9"}}'.encode("latin-1"))
    code = main(["eval", "--model", str(model_dir), "--task", "gqa", "--data", str(folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "testdev_balanced_questions.json: not UTF-8 text" in err and "Traceback" not in err


@pytest.mark.parametrize("content, args, message", [
    ("name: caf\xe9\n".encode("latin-1"), [], "is not UTF-8 text"),
    (b"stages: [\n", [], "is not valid YAML"),
    (b"- a list\n", [], "must hold a mapping at the top level"),
    (b"name: x\n", ["stages.x=["], "the value is not valid YAML"),
    (None, [], "not a file and not a shipped recipe"),
])
def test_bad_recipe_files_and_overrides(tmp_path, capsys, content, args, message):
    path = tmp_path / "recipe.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["train", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
