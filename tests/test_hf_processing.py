"""Parity with Hugging Face: Jinja chat templates, LlavaProcessor ids and image processors' pixel_values.

Everything is built here (tiny trained BPE tokenizers, images from numpy); nothing is downloaded.
"""

from __future__ import annotations

import copy
import json

import jinja2
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vlmkit.processing.hf_image import hf_image_processor, image_transform_from_hf
from vlmkit.processing.image import ImageTransform, to_rgb
from vlmkit.processing.jinja import chat_template_jinja
from vlmkit.processing.processor import VLMProcessor
from vlmkit.processing.templates import TEMPLATES, FormatTemplate, Message, TemplateError

NAMED = ("plain", "qa", "vicuna_v1", "llama3", "chatml")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMG = {"type": "image"}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


# HF list-content conversations; vlmkit's string form joins the parts (an image part is "<image>\n")
CONVERSATIONS = {
    "one_turn_image": [{"role": "user", "content": [IMG, text("what color is the shape?")]}],
    "no_image": [{"role": "user", "content": [text("hello world")]}],
    "system_two_images": [
        {"role": "system", "content": [text("Answer briefly.")]},
        {"role": "user", "content": [IMG, IMG, text("is there a red circle?")]},
        {"role": "assistant", "content": [text("yes")]},
    ],
    "empty_system": [
        {"role": "system", "content": ""},
        {"role": "user", "content": [IMG, text("what shape?")]},
        {"role": "assistant", "content": "rectangle"},
    ],
    "three_turns": [
        {"role": "user", "content": [IMG, text("Describe the image.")]},
        {"role": "assistant", "content": [text("A green triangle.")]},
        {"role": "user", "content": [text("what color?"), IMG]},
        {"role": "assistant", "content": "green"},
        {"role": "user", "content": "and <image> here?"},
        {"role": "assistant", "content": [text("no")]},
    ],
    "three_turns_open": [
        {"role": "system", "content": "You are helpful, 'precise' & {terse}."},
        {"role": "user", "content": [IMG, text("hi")]},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [text("what shape?")]},
        {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": [text("sure?")]},
    ],
}


def flat(content) -> str:
    if isinstance(content, str):
        return content
    return "".join("<image>\n" if p["type"] == "image" else p["text"] for p in content)


def as_vlmkit(conv: list[dict]) -> list[Message]:
    return [Message(m["role"], flat(m["content"])) for m in conv]


def as_strings(conv: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": flat(m["content"])} for m in conv]


def rendered(template, tokenizer, msgs: list[Message], gen: bool) -> str:
    return "".join(t for t, _ in template.segments(msgs, tokenizer, gen))


def images(n: int, seed: int = 0, size=(40, 28)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def bos_tokenizer(bpe_tokenizer):
    """The BPE vocabulary with a BOS ``<s>`` distinct from EOS ``</s>``, and a post-processor that adds BOS
    (like Llama's), to see where transformers adds special tokens."""
    backend = copy.deepcopy(bpe_tokenizer.backend_tokenizer)
    backend.add_special_tokens(["<s>", "</s>"])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"], add_bos_token=True,
    )
    assert tok("hi")["input_ids"][0] == tok.bos_token_id != tok.eos_token_id
    return tok


@pytest.fixture(params=["bpe", "bos"])
def any_tokenizer(request, bpe_tokenizer, bos_tokenizer):
    return bpe_tokenizer if request.param == "bpe" else bos_tokenizer


# ---------------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("name", NAMED)
def test_jinja_renders_exactly_like_the_vlmkit_template(name, any_tokenizer):
    template = TEMPLATES.get(name)
    jinja = chat_template_jinja(template, any_tokenizer)
    checked = 0
    for conv in CONVERSATIONS.values():
        for gen in (False, True):
            if not gen and conv[-1]["role"] != "assistant":
                continue  # vlmkit cannot train on a conversation without a reply
            want = rendered(template, any_tokenizer, as_vlmkit(conv), gen)
            for form in (copy.deepcopy(conv), as_strings(conv)):
                got = any_tokenizer.apply_chat_template(
                    form, tokenize=False, add_generation_prompt=gen, chat_template=jinja
                )
                assert got == want, (name, gen, form)
                checked += 1
    assert checked == 18
    if template.bos:
        assert want.startswith(any_tokenizer.bos_token)


def test_jinja_details_system_prompt_eos_and_images_only_user(bpe_tokenizer, bos_tokenizer):
    vicuna = TEMPLATES.get("vicuna_v1")
    conv = [{"role": "user", "content": [IMG, text("q")]}]
    default = bos_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True,
                                                chat_template=chat_template_jinja(vicuna, bos_tokenizer))
    assert default.startswith("<s>A chat between") and default.endswith("USER: <image>\nq ASSISTANT:")
    # a processor's system_prompt replaces the template default ("" removes it), as VLMProcessor does
    for system in ("", "Be brief."):
        jinja = chat_template_jinja(vicuna, bos_tokenizer, system_prompt=system)
        proc = VLMProcessor(copy.deepcopy(bos_tokenizer), vicuna, ImageTransform(8, (0.5,) * 3, (0.5,) * 3), 1,
                            system_prompt=system)
        want = proc.tokenizer.decode(proc.tokenize([Message("user", "<image>\nq")], add_generation_prompt=True)[0])
        got = bos_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, chat_template=jinja)
        assert got == want == ("<s>" + (system + " " if system else "") + "USER: <image>\nq ASSISTANT:")
    # {eos} is the tokenizer's eos_token; plain keeps only the user's placeholders
    chat = [{"role": "user", "content": [IMG, IMG, text("ignored text")]}, {"role": "assistant", "content": "cap"}]
    plain = bos_tokenizer.apply_chat_template(chat, tokenize=False, chat_template=chat_template_jinja(
        TEMPLATES.get("plain"), bos_tokenizer))
    assert plain == "<image><image>cap</s>"
    # a user turn last without a generation prompt renders without the assistant prefix (vlmkit refuses it)
    chatml = chat_template_jinja(TEMPLATES.get("chatml"), bpe_tokenizer)
    assert bpe_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             chat_template=chatml) == "<|im_start|>user\nhi<|im_end|>\n"


def test_jinja_escapes_any_literal_text(bpe_tokenizer):
    odd = FormatTemplate(
        name="odd", system="«{content}» \\ '%}}' {{x}}\n", user="U\r\t{{%- raw -%}}: {content}\"",
        assistant_prefix="{#A#}{{ é }}\n", assistant="{content}{eos}😀", assistant_suffix="\\n'", bos=True,
        default_system="sys {{ not jinja }} \\' \x00", first_separator="#}",
    )
    jinja = chat_template_jinja(odd, bpe_tokenizer)
    for conv in (CONVERSATIONS["three_turns"], CONVERSATIONS["three_turns_open"]):
        want = rendered(odd, bpe_tokenizer, as_vlmkit(conv), True)
        assert bpe_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True,
                                                 chat_template=jinja) == want


def test_jinja_rejects_what_vlmkit_rejects(bpe_tokenizer):
    jinja = chat_template_jinja(TEMPLATES.get("chatml"), bpe_tokenizer)
    bad = {
        "alternate": [{"role": "assistant", "content": "hi"}],
        "has role system": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        "empty": [{"role": "system", "content": "only a system message"}],
        "not video": [{"role": "user", "content": [{"type": "video"}, text("q")]}],
    }
    for match, conv in bad.items():
        with pytest.raises(jinja2.TemplateError, match=match):
            bpe_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, chat_template=jinja)
    with pytest.raises(ValueError, match=r"\{foo\}"):
        chat_template_jinja(FormatTemplate("x", "", "{content} {foo}", "", "{content}"), bpe_tokenizer)
    with pytest.raises(ValueError, match=r"\{content!r\}"):
        chat_template_jinja(FormatTemplate("x", "", "{content!r}", "", "{content}"), bpe_tokenizer)
    with pytest.raises(ValueError, match=r"\{eos\}"):
        chat_template_jinja(FormatTemplate("x", "{eos}", "{content}", "", "{content}"), bpe_tokenizer)


def test_tokenizer_template_is_the_tokenizers_own(tokenizer):
    template = TEMPLATES.get("tokenizer")
    with pytest.raises(TemplateError, match="chat_template"):
        chat_template_jinja(template, tokenizer)
    own = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    tokenizer.chat_template = own
    assert chat_template_jinja(template, tokenizer) is own
    with pytest.raises(ValueError, match="system_prompt"):
        chat_template_jinja(template, tokenizer, system_prompt="")
    msgs = as_strings(CONVERSATIONS["three_turns_open"])
    assert tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == rendered(
        template, tokenizer, as_vlmkit(CONVERSATIONS["three_turns_open"]), True)


# ---------------------------------------------------------------------------------------------- (b)
def vlm_processor(tokenizer, name, transform=None, num_image_tokens=16) -> VLMProcessor:
    transform = transform or ImageTransform(32, CLIP_MEAN, CLIP_STD, "crop")
    return VLMProcessor(copy.deepcopy(tokenizer), TEMPLATES.get(name), transform, num_image_tokens)


@pytest.mark.parametrize("name", NAMED)
def test_tokenizer_apply_chat_template_ids_equal_vlmkit(name, any_tokenizer):
    """tokenize=True encodes with add_special_tokens=False: no BOS doubling even when the post-processor adds one."""
    proc = vlm_processor(any_tokenizer, name)
    jinja = chat_template_jinja(proc.template, any_tokenizer)
    for key in ("three_turns", "three_turns_open", "system_two_images"):
        conv = CONVERSATIONS[key]
        out = any_tokenizer.apply_chat_template(copy.deepcopy(conv), tokenize=True, add_generation_prompt=True,
                                                chat_template=jinja)
        ids, _ = proc.tokenize(as_vlmkit(conv), add_generation_prompt=True)
        assert out["input_ids"] == ids, (name, key)
        if proc.template.bos:
            assert ids[:2].count(any_tokenizer.bos_token_id) == 1


def llava_processor(tokenizer, name, transform, system_prompt=None):
    # CLIP-style tower: 32 px / patch 8 = 16 patches + CLS, the CLS dropped by the 'default' strategy -> 16
    return transformers.LlavaProcessor(
        image_processor=hf_image_processor(transform), tokenizer=copy.deepcopy(tokenizer), patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_template_jinja(TEMPLATES.get(name), tokenizer, system_prompt=system_prompt),
    )


@pytest.mark.parametrize("name, tok, aspect", [
    ("chatml", "bpe", "crop"), ("vicuna_v1", "bpe", "pad"), ("vicuna_v1", "bos", "crop"),
    ("llama3", "bos", "resize"), ("qa", "bpe", "resize"), ("plain", "bpe", "pad"),
])
def test_llava_processor_gives_vlmkits_input_ids_and_pixels(name, tok, aspect, bpe_tokenizer, bos_tokenizer):
    tokenizer = bpe_tokenizer if tok == "bpe" else bos_tokenizer
    transform = ImageTransform(32, CLIP_MEAN, CLIP_STD, aspect)
    ours = vlm_processor(tokenizer, name, transform)
    hf = llava_processor(tokenizer, name, transform)
    img, img2 = images(2, size=(61, 40))
    want = ours.prompt("what color is the shape?", [img])
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, text("what color is the shape?")]}]
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                 return_tensors="pt")
    assert out["input_ids"][0].tolist() == want.input_ids.tolist()
    assert out["input_ids"][0].tolist().count(ours.image_token_id) == 16
    assert torch.equal(out["pixel_values"], want.pixel_values)
    # the same through processor(text=..., images=...) with the rendered prompt and two images
    prompt = hf.apply_chat_template([{"role": "user", "content": [IMG, IMG, text("which is red?")]}],
                                    add_generation_prompt=True)
    out = hf(text=prompt, images=[img, img2], return_tensors="pt", add_special_tokens=False)
    want = ours.prompt("which is red?", [img, img2])
    assert out["input_ids"][0].tolist() == want.input_ids.tolist()
    assert torch.equal(out["pixel_values"], want.pixel_values)


def test_where_transformers_adds_special_tokens(bpe_tokenizer, bos_tokenizer):
    """A tokenizer whose post-processor adds BOS: the processor paths add it unless told not to."""
    transform = ImageTransform(32, CLIP_MEAN, CLIP_STD, "crop")
    img = images(1)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, text("hi")]}]
    bos = bos_tokenizer.bos_token_id
    for name in ("vicuna_v1", "chatml"):
        want = vlm_processor(bos_tokenizer, name, transform).prompt("hi", [img]).input_ids.tolist()
        hf = llava_processor(bos_tokenizer, name, transform)
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[0]
        prompt = hf.apply_chat_template(messages, add_generation_prompt=True)
        direct = hf(text=prompt, images=[img])["input_ids"][0]
        quiet = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       processor_kwargs={"add_special_tokens": False})[0]
        assert quiet == want
        if name == "vicuna_v1":  # the prompt starts with bos_token: apply_chat_template adds nothing
            assert want[0] == bos and want[1] != bos
            assert ids == want
            assert direct == [bos] + want  # processor(text=...) doubles the template's BOS
        else:  # no BOS in the text: the processor adds the post-processor's BOS, vlmkit does not
            assert want[0] != bos
            assert ids == [bos] + want and direct == [bos] + want
    # a post-processor that adds nothing (vlmkit's trained BPE): every path gives vlmkit's ids
    want = vlm_processor(bpe_tokenizer, "chatml", transform).prompt("hi", [img]).input_ids.tolist()
    hf = llava_processor(bpe_tokenizer, "chatml", transform)
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[0] == want
    assert hf(text=hf.apply_chat_template(messages, add_generation_prompt=True), images=[img])["input_ids"][0] == want


# ---------------------------------------------------------------------------------------------- (c)
SIZES = [(48, 48), (96, 32), (32, 96), (20, 15), (97, 61), (61, 97), (33, 32)]


def hf_pixels(processor, img) -> torch.Tensor:
    return processor(images=img, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("aspect", ["crop", "pad", "resize"])
def test_pixels_equal_the_hf_image_processor(aspect):
    rng = np.random.default_rng(1)
    for side in (32, 29):
        transform = ImageTransform(side, CLIP_MEAN, CLIP_STD, aspect)
        processor = hf_image_processor(transform)
        assert processor.backend == "pil"
        for w, h in SIZES:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ours, ref = transform(img), hf_pixels(processor, img)
            assert ours.shape == ref.shape == (3, side, side) and ours.dtype == ref.dtype == torch.float32
            assert torch.equal(ours, ref), (aspect, side, (w, h), (ours - ref).abs().max())


def _modes(rng) -> dict[str, Image.Image]:
    rgb = rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (61, 97, 1), dtype=np.uint8)
    out = {
        "RGBA": Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA"),
        "L": Image.fromarray(rgb[..., 0], "L"),
        "LA": Image.fromarray(np.concatenate([rgb[..., :1], alpha], -1), "LA"),
        "P": Image.fromarray(rgb).quantize(16),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "1": Image.fromarray(rgb[..., 0] > 128),
    }
    p = Image.fromarray(rgb).quantize(16)
    p.info["transparency"] = 3
    out["P+transparency"] = p
    keyed = Image.fromarray(rgb // 64 * 64)  # an RGB PNG's tRNS colour key
    keyed.info["transparency"] = (64, 128, 0)
    out["RGB+transparency"] = keyed
    grey = Image.fromarray(rgb[..., 0] // 64 * 64, "L")
    grey.info["transparency"] = 128
    out["L+transparency"] = grey
    return out


@pytest.mark.parametrize("aspect", ["crop", "pad", "resize"])
def test_pixels_equal_for_other_modes(aspect):
    transform = ImageTransform(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), aspect)
    processor = hf_image_processor(transform)
    for mode, img in _modes(np.random.default_rng(2)).items():
        assert torch.equal(transform(img), hf_pixels(processor, img)), (aspect, mode)


def test_colour_keyed_transparency_becomes_white():
    img = Image.new("RGB", (2, 1), (10, 20, 30))
    img.putpixel((1, 0), (1, 2, 3))
    img.info["transparency"] = (1, 2, 3)  # what Pillow reads from an RGB PNG's tRNS chunk
    assert to_rgb(img).getpixel((0, 0)) == (10, 20, 30) and to_rgb(img).getpixel((1, 0)) == (255, 255, 255)


def test_pad_colour_is_llavas_truncated_mean():
    transform = ImageTransform(16, CLIP_MEAN, CLIP_STD, "pad")
    g = transform.geometry(Image.new("RGB", (16, 4), (255, 255, 255)))
    assert g.getpixel((8, 0)) == (122, 116, 104)  # int(m * 255), as LLaVA-1.5's expand2square


def test_strips_are_exact_until_the_pixel_budget(monkeypatch):
    """Strips far beyond 8:1 are exact while their intermediate image fits RESAMPLE_PIXEL_BUDGET; over it
    vlmkit resamples a window (crop) or shrinks first (pad) to bound memory and parts from transformers
    (which would build e.g. a 20000^2 canvas): crop by Pillow's rounding, pad at the band edges."""
    rng = np.random.default_rng(3)
    strips = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((10, 300), (600, 1))]
    transforms = [ImageTransform(16, CLIP_MEAN, CLIP_STD, a) for a in ("crop", "pad", "resize")]
    for img in strips:
        for t in transforms:
            assert torch.equal(t(img), hf_pixels(hf_image_processor(t), img)), (t.aspect, img.size)
    monkeypatch.setattr("vlmkit.processing.image.RESAMPLE_PIXEL_BUDGET", 1000)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    for t, bound in zip(transforms, (16, 48, 0)):  # in 8-bit levels; measured 11 (crop) and 36 (pad)
        levels = [float(((t(img) - hf_pixels(hf_image_processor(t), img)).abs() * std * 255).max()) for img in strips]
        assert max(levels) <= bound and (max(levels) > 0) == (t.aspect != "resize"), (t.aspect, levels)


# ---------------------------------------------------------------------------------------------- (d)
@pytest.mark.parametrize("aspect, cls", [("crop", "CLIPImageProcessor"), ("pad", "LlavaImageProcessor"),
                                         ("resize", "BlipImageProcessor")])
def test_image_transform_round_trips_through_the_hf_config(aspect, cls, tmp_path):
    transform = ImageTransform(29, CLIP_MEAN, (0.25, 0.5, 1.0), aspect)
    processor = hf_image_processor(transform)
    assert image_transform_from_hf(processor) == transform
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == cls
    assert image_transform_from_hf(saved) == transform
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert loaded.backend == "pil" and image_transform_from_hf(loaded) == transform
    img = images(1, size=(97, 61))[0]
    assert torch.equal(hf_pixels(loaded, img), transform(img))


@pytest.mark.parametrize("cfg, want", [
    ({"image_processor_type": "CLIPImageProcessor", "size": 24, "crop_size": 24}, ("crop", 24)),
    ({"image_processor_type": "CLIPImageProcessor", "size": {"height": 24, "width": 24}, "crop_size": 24},
     ("resize", 24)),
    ({"image_processor_type": "BlipImageProcessor", "size": 24}, ("resize", 24)),
    ({"image_processor_type": "LlavaImageProcessorPil", "size": 24, "crop_size": {"height": 24, "width": 24},
      "do_pad": True}, ("pad", 24)),
    ({"size": {"shortest_edge": 24}, "do_center_crop": True, "crop_size": {"height": 24, "width": 24},
      "image_mean": [0.5] * 3, "image_std": 0.5}, ("crop", 24)),
    ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 24, "width": 24}}, ("resize", 24)),
])
def test_image_transform_from_hf_reads_size_forms(cfg, want):
    transform = image_transform_from_hf(cfg)
    assert (transform.aspect, transform.size) == want
    if "image_mean" in cfg:
        assert transform.mean == (0.5,) * 3 and transform.std == (0.5,) * 3
    elif "Siglip" in cfg["image_processor_type"]:
        assert transform.mean == transform.std == (0.5,) * 3
    else:
        assert transform.mean == CLIP_MEAN and transform.std == CLIP_STD


def test_do_normalize_false_is_mean_zero_std_one():
    processor = transformers.BlipImageProcessorPil(size={"height": 24, "width": 24}, do_normalize=False)
    transform = image_transform_from_hf(processor)
    assert transform == ImageTransform(24, (0.0,) * 3, (1.0,) * 3, "resize")
    img = images(1, size=(30, 50))[0]
    assert torch.equal(transform(img), hf_pixels(processor, img))


CLIP_CFG = hf_image_processor(ImageTransform(32, CLIP_MEAN, CLIP_STD, "crop")).to_dict()


@pytest.mark.parametrize("change, field", [
    ({"crop_size": {"height": 32, "width": 24}}, "crop_size"),
    ({"resample": 2}, "resample"),
    ({"resample": "nearest"}, "resample"),
    ({"do_rescale": False}, "do_rescale"),
    ({"rescale_factor": 1 / 127.5}, "rescale_factor"),
    ({"size": {"shortest_edge": 36}}, "crop_size"),
    ({"size": {"height": 32, "width": 48}}, "size"),
    ({"size": {"longest_edge": 32}}, "size"),
    ({"size": {"shortest_edge": 32, "longest_edge": 64}}, "size"),
    ({"do_center_crop": False}, "do_center_crop"),
    ({"do_resize": False}, "do_resize"),
    ({"do_convert_rgb": False}, "do_convert_rgb"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"image_processor_type": "ConvNextImageProcessor"}, "image_processor_type"),
    ({"do_pad": True}, "do_pad"),
    ({"crop_pct": 0.875}, "crop_pct"),
])
def test_image_transform_from_hf_names_the_unsupported_field(change, field):
    with pytest.raises(ValueError, match=field):
        image_transform_from_hf({**CLIP_CFG, **change})
