"""hf-blip2: transformers' BLIP-2 folders (OPT and Flan-T5) load in vlmkit with the same logits,
generations, pixels and prompt tokens; vlmkit's BLIP-2 models export to folders transformers loads."""

from __future__ import annotations

import pytest
import torch
import transformers

from formats_helpers import image, save_hf_blip2
from vlmkit.formats import FormatError, detect_format, export_model, load_any

GEN = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)


def _inputs(folder, question="what shape is it?"):
    processor = transformers.AutoProcessor.from_pretrained(folder)
    return processor(images=image(2), text=f"Question: {question} Answer:", return_tensors="pt")


def _logits(model, inputs, decoder_input_ids=None):
    with torch.no_grad():
        embeds = model.embed(inputs["input_ids"], inputs["pixel_values"], None)
        kw = {"decoder_input_ids": decoder_input_ids} if decoder_input_ids is not None else {}
        return model.language.logits(embeds, inputs["attention_mask"], **kw)


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_a_transformers_blip2_folder_loads_with_equal_logits_generations_and_inputs(tmp_path, text):
    folder = save_hf_blip2(tmp_path / "hf", text)
    assert detect_format(folder) == "hf-blip2"
    loaded = load_any(folder)
    assert loaded.config.connector.type == "qformer" and loaded.model.vision.spec.name == "blip2"
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    inputs = _inputs(folder)
    decoder = torch.tensor([[0, 5, 9, 11]]) if text == "t5" else None
    with torch.no_grad():
        ref = hf(**inputs, **({"decoder_input_ids": decoder} if decoder is not None else {})).logits
    ours = _logits(loaded.model, inputs, decoder)
    if text == "opt":  # BLIP-2 returns logits for the text positions after the queries only in some versions
        ref = ref[:, -ours.shape[1]:]
    assert (ours - ref).abs().max().item() <= 1e-5
    with torch.no_grad():
        ref_ids = hf.generate(**inputs, **GEN)
    ids = loaded.model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], **GEN)
    ref_new = ref_ids[:, inputs["input_ids"].shape[1]:] if text == "opt" else ref_ids[:, 1:]
    assert ids.tolist() == ref_new.tolist()
    # vlmkit's processor (template blip2 / blip2_t5) builds what Blip2Processor builds
    enc = loaded.processor.prompt("what shape is it?", [image(2)])
    assert enc.input_ids.tolist() == inputs["input_ids"][0].tolist()
    assert torch.equal(enc.pixel_values, inputs["pixel_values"])


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_blip2_round_trips_through_a_vlmkit_export(tmp_path, text):
    folder = save_hf_blip2(tmp_path / "hf", text)
    loaded = load_any(folder)
    dst = export_model(loaded.model, loaded.processor, loaded.config, "hf-blip2", tmp_path / "out")
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(dst).eval()
    inputs = _inputs(dst)
    decoder = torch.tensor([[0, 7, 3]]) if text == "t5" else None
    with torch.no_grad():
        ref = hf(**inputs, **({"decoder_input_ids": decoder} if decoder is not None else {})).logits
    ours = _logits(loaded.model, inputs, decoder)
    assert (ours - ref[:, -ours.shape[1]:]).abs().max().item() <= 1e-5
    again = load_any(dst)
    assert again.processor.template.name == loaded.processor.template.name


def test_a_llava_style_model_cannot_be_written_as_blip2(build_tiny, tmp_path):
    from conftest import tiny_model_config

    model, processor = build_tiny()
    with pytest.raises(FormatError, match=r"vision: a clip tower.*formats that can hold it: [^)]*hf-llava.*\n  connector: mlp2x_gelu"):
        export_model(model, processor, tiny_model_config(), "hf-blip2", tmp_path / "out")
    assert not (tmp_path / "out").exists()
