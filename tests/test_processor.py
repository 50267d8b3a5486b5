"""Processor: placeholder expansion, image-count and length errors, batching with either padding side."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmkit.processing.image import ImageTransform
from vlmkit.processing.processor import IGNORE_INDEX, EncodingError, VLMProcessor
from vlmkit.processing.templates import TEMPLATES, Message


@pytest.fixture
def proc(tokenizer) -> VLMProcessor:
    return VLMProcessor(tokenizer, TEMPLATES.get("chatml"), ImageTransform(16, (0.5,) * 3, (0.5,) * 3), 4, 64, "")


def conv(text="<image>\nwhat color?", answer="blue"):
    return [Message("user", text), Message("assistant", answer)]


def test_placeholder_expands_to_connector_token_count(proc):
    enc = proc.encode(conv(), [Image.new("RGB", (20, 20))])
    ids = enc.input_ids.tolist()
    assert ids.count(proc.image_token_id) == 4
    first = ids.index(proc.image_token_id)
    assert ids[first : first + 4] == [proc.image_token_id] * 4
    assert enc.labels[first : first + 4].tolist() == [IGNORE_INDEX] * 4
    assert enc.pixel_values.shape == (1, 3, 16, 16)


def test_two_images_keep_order(proc):
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    enc = proc.encode(conv("<image> and <image>: which is red?", "first"), [red, blue])
    assert enc.pixel_values.shape[0] == 2
    assert enc.pixel_values[0, 0].mean() > 0 > enc.pixel_values[1, 0].mean()


@pytest.mark.parametrize("n_images, n_placeholders", [(0, 1), (2, 1), (1, 0)])
def test_placeholder_image_count_mismatch(proc, n_images, n_placeholders):
    text = "<image>" * n_placeholders + "what?"
    with pytest.raises(EncodingError, match=f"{n_placeholders} <image> placeholder\\(s\\) but {n_images} image"):
        proc.encode(conv(text), [Image.new("RGB", (8, 8))] * n_images)


def test_too_long_names_length_and_limit(proc):
    with pytest.raises(EncodingError, match=r"more than model.max_length=64"):
        proc.encode(conv("<image>" + " word" * 80), [Image.new("RGB", (8, 8))])


def test_right_and_left_padding(proc):
    short = proc.encode(conv(answer="no"), [Image.new("RGB", (8, 8))])
    long = proc.encode(conv("<image>\nwhat color is the shape in this picture?"), [Image.new("RGB", (8, 8))])
    n_s, n_l = short.input_ids.numel(), long.input_ids.numel()
    right = proc.collate([short, long], "right")
    assert right["input_ids"].shape == (2, n_l)
    assert right["attention_mask"][0].tolist() == [1] * n_s + [0] * (n_l - n_s)
    assert right["labels"][0, n_s:].eq(IGNORE_INDEX).all()
    assert right["image_counts"].tolist() == [1, 1]
    left = proc.collate([short, long], "left")
    assert left["attention_mask"][0].tolist() == [0] * (n_l - n_s) + [1] * n_s
    assert left["input_ids"][0, n_l - n_s :].tolist() == short.input_ids.tolist()


def test_prompt_adds_missing_placeholder_and_no_labels(proc):
    enc = proc.prompt("what shape?", [Image.new("RGB", (8, 8))])
    assert enc.labels is None
    assert enc.input_ids.tolist().count(proc.image_token_id) == 4
    assert proc.tokenizer.decode(enc.input_ids.tolist()).endswith("<|im_start|>assistant\n")


def test_slow_tokenizer_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast"):
        VLMProcessor(Slow(), TEMPLATES.get("chatml"), ImageTransform(8, (0.5,) * 3, (0.5,) * 3), 1)
