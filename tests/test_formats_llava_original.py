"""llava-original: haotian-liu/LLaVA checkpoints (safetensors, or pickles with the opt-in) load with
the logits transformers' LLaVA computes from the same weights; stage-1 mm_projector.bin files
initialise a connector."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from formats_helpers import hf_inputs, save_hf_llava
from vlmkit.fileio import save_tensors
from vlmkit.formats import FormatError, detect_format, export_model, load_any

#: written here by hand, independently of vlmkit's tables: transformers' in-memory LLaVA names -> LLaVA's
ORIGINAL_NAMES = (
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)


def _original_state(hf_model, with_tower=True):
    out = {}
    for key, tensor in hf_model.state_dict().items():
        for src, dst in ORIGINAL_NAMES:
            if key.startswith(src):
                if with_tower or not src.startswith("model.vision_tower."):
                    out[dst + key[len(src):]] = tensor.clone()
                break
    return out


def write_original(tmp_path, pickle=False, with_tower=True):
    """An original-LLaVA-layout checkpoint of a random transformers LLaVA, and the reference model."""
    hf_folder = save_hf_llava(tmp_path / "hf")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(hf_folder).eval()
    tower = tmp_path / "clip-tower"  # what mm_vision_tower names (a hub id in real checkpoints)
    if with_tower:  # the tower's weights are in the checkpoint; its folder gives the config and preprocessing
        transformers.CLIPVisionConfig(**hf.config.vision_config.to_dict()).save_pretrained(tower)
    else:  # a frozen tower is not saved with the model: its weights come from mm_vision_tower
        hf.model.vision_tower.save_pretrained(tower)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tower)
    folder = tmp_path / "llava-v1.5-tiny"
    folder.mkdir()
    config = hf.config.text_config.to_dict()
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(tower),
                  mm_projector_type="mlp2x_gelu", mm_hidden_size=32, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  image_aspect_ratio="square", mm_use_im_start_end=False, mm_use_im_patch_token=False)
    (folder / "config.json").write_text(json.dumps(config))
    state = _original_state(hf, with_tower)
    if pickle:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_tensors(state, folder / "model.safetensors")
    transformers.AutoTokenizer.from_pretrained(hf_folder).save_pretrained(folder)
    return folder, hf, hf_folder


@pytest.mark.parametrize("with_tower", [True, False])
def test_an_original_llava_checkpoint_loads_with_the_reference_logits(tmp_path, with_tower):
    folder, hf, hf_folder = write_original(tmp_path, with_tower=with_tower)
    assert detect_format(folder) == "llava-original"
    loaded = load_any(folder)
    assert loaded.processor.template.name == "vicuna_v1" and loaded.config.connector.type == "mlp2x_gelu"
    inputs = hf_inputs(hf_folder)
    with torch.no_grad():
        ref = hf(**inputs).logits
        ours = loaded.model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits
    assert (ours - ref).abs().max().item() <= 1e-5


def test_a_pickled_checkpoint_needs_the_opt_in_and_then_loads(tmp_path):
    folder, hf, hf_folder = write_original(tmp_path, pickle=True)
    with pytest.raises(FormatError, match=r"pytorch_model\.bin is a Python pickle.*--allow-pickle"):
        load_any(folder)
    loaded = load_any(folder, allow_pickle=True)
    inputs = hf_inputs(hf_folder)
    with torch.no_grad():
        diff = (loaded.model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits - hf(**inputs).logits)
    assert diff.abs().max().item() <= 1e-5


def test_a_pickle_that_is_not_plain_tensors_is_refused_even_with_the_opt_in(tmp_path):
    folder, _, _ = write_original(tmp_path, pickle=True)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"model.norm.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(FormatError, match=r"weights_only=True\) refused it"):
        load_any(folder, allow_pickle=True)


def test_a_stage1_mm_projector_bin_initialises_the_connector(tmp_path, build_tiny):
    from conftest import tiny_model_config
    from vlmkit.models.build import build_model

    model, _ = build_tiny()
    projector = {"model.mm_projector.0.weight": torch.randn(32, 32), "model.mm_projector.0.bias": torch.randn(32),
                 "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.randn(32)}
    torch.save(projector, tmp_path / "mm_projector.bin")
    cfg = tiny_model_config()
    cfg.connector.pretrained = str(tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match="mm_projector.bin is a Python pickle"):
        build_model(cfg, tokenizer=build_tiny()[1].tokenizer)
    cfg.allow_pickle = True
    built, _ = build_model(cfg, tokenizer=build_tiny()[1].tokenizer)
    assert torch.equal(built.connector.mlp[2].weight, projector["model.mm_projector.2.weight"])


def test_vlmkit_models_export_to_the_original_layout_and_read_back(build_tiny, tmp_path):
    from conftest import tiny_model_config

    kw = dict(backbone="vicuna", template="vicuna_v1", feature_layer=-2)
    model, processor = build_tiny(**kw)
    dst = export_model(model.eval(), processor, tiny_model_config(**kw), "llava-original", tmp_path / "orig")
    again = load_any(dst)
    ids = processor.prompt("what color?", [torch.zeros(3, 32, 32)])
    x = ids.input_ids[None]
    with torch.no_grad():
        a = model(x, torch.ones_like(x), ids.pixel_values).logits
        b = again.model(x, torch.ones_like(x), ids.pixel_values).logits
    assert (a - b).abs().max().item() <= 1e-6
