"""hf-llava: transformers' LLaVA folders load in vlmkit with the same logits and generations, and
vlmkit models export to folders transformers' Auto classes load the same way."""

from __future__ import annotations

import pytest
import torch
import transformers

import vlmkit
from formats_helpers import hf_inputs, image, save_hf_llava
from vlmkit.formats import FormatError, detect_format, export_model, load_any

GEN = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)


def _vlmkit_logits(model, inputs):
    with torch.no_grad():
        return model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_a_transformers_llava_folder_loads_with_equal_logits_and_generations(tmp_path, tower):
    folder = save_hf_llava(tmp_path / "hf", tower)
    assert detect_format(folder) == "hf-llava"
    loaded = load_any(folder)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = hf_inputs(folder)
    with torch.no_grad():
        ref = hf(**inputs).logits
    ours = _vlmkit_logits(loaded.model, inputs)
    assert (ours - ref).abs().max().item() <= 1e-5
    with torch.no_grad():
        ref_ids = hf.generate(**inputs, **GEN)[:, inputs["input_ids"].shape[1]:]
    ids = loaded.model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], **GEN)
    assert ids.tolist() == ref_ids.tolist()
    # vlmkit's own processor gives the same pixels and tokens for the same question
    enc = loaded.processor.prompt("what shape is it?", [image(0)])
    assert enc.input_ids.tolist() == inputs["input_ids"][0].tolist()
    assert torch.equal(enc.pixel_values, inputs["pixel_values"])


def test_vlmkit_load_reads_the_folder_and_answers(tmp_path):
    folder = save_hf_llava(tmp_path / "hf")
    pipe = vlmkit.load(folder)
    assert isinstance(pipe.chat(image(1), "what color?", max_new_tokens=3), str)


def _hf_generate_answer(folder, question, img, max_new_tokens=20):
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=img, text=prompt, return_tensors="pt")
    return model, inputs


@pytest.mark.parametrize("encoder,template,drop_cls", [("clip", "chatml", True), ("siglip", "chatml", True), ("clip", "vicuna_v1", False)])
def test_a_vlmkit_model_exports_to_a_folder_transformers_loads_the_same(build_tiny, tmp_path, encoder, template, drop_cls):
    model, processor = build_tiny(encoder=encoder, template=template, drop_cls=drop_cls)
    from conftest import tiny_model_config

    cfg = tiny_model_config(encoder=encoder, template=template, drop_cls=drop_cls)
    dst = export_model(model.eval(), processor, cfg, "hf-llava", tmp_path / "out")
    hf, inputs = _hf_generate_answer(dst, "what shape is it?", image(3))
    enc = processor.prompt("what shape is it?", [image(3)])
    # transformers' processor + the exported Jinja template give vlmkit's tokens and pixels
    assert inputs["input_ids"][0].tolist() == enc.input_ids.tolist()
    assert torch.equal(inputs["pixel_values"][0], enc.pixel_values[0])
    with torch.no_grad():
        ref = hf(**inputs).logits
    ours = _vlmkit_logits(model, inputs)
    assert (ours - ref).abs().max().item() <= 1e-5
    with torch.no_grad():
        ref_ids = hf.generate(**inputs, **GEN)[:, inputs["input_ids"].shape[1]:]
    assert model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], **GEN).tolist() == ref_ids.tolist()
    # and back: the exported folder reads into vlmkit with its template and equal logits
    again = load_any(dst)
    assert again.processor.template.name == template
    assert (_vlmkit_logits(again.model, inputs) - ours).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kw,part,able", [
    ({"encoder": "bit"}, "vision", "vlmkit"),
    ({"connector": "linear"}, "connector", "llava-original"),
    ({"connector_options": {"merge": 2}}, "connector", "vlmkit"),
    ({"connector": "c_abstractor", "connector_options": {"num_queries": 4}}, "connector", "vlmkit"),
    ({"backbone": "flan_t5"}, "language", "vlmkit"),
])
def test_export_refuses_what_hf_llava_cannot_express_and_writes_nothing(build_tiny, tmp_path, kw, part, able):
    from conftest import tiny_model_config

    model, processor = build_tiny(**kw)
    dst = tmp_path / "out"
    with pytest.raises(FormatError, match=rf"hf-llava cannot express.*\n  {part}: .*formats that can hold it: [^)]*{able}"):
        export_model(model, processor, tiny_model_config(**kw), "hf-llava", dst)
    assert not dst.exists() and not list(tmp_path.iterdir())


def test_cross_attention_fusion_is_refused_by_hf_llava(tokenizer, tmp_path):
    from conftest import tiny_model_config
    from vlmkit.config import FusionConfig
    from vlmkit.models.build import build_model

    cfg = tiny_model_config()
    cfg.fusion = FusionConfig(type="cross_attention", options={"every": 1})
    model, processor = build_model(cfg, tokenizer=tokenizer)
    with pytest.raises(FormatError, match="fusion: cross_attention fusion"):
        export_model(model, processor, cfg, "hf-llava", tmp_path / "out")
    assert not (tmp_path / "out").exists()
