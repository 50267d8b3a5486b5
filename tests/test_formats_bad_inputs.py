"""Damaged or foreign checkpoints fail with an error naming the file, tensor or part; nothing is half-loaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from formats_helpers import save_hf_llava
from vlmkit.formats import FormatError, load_any


@pytest.fixture
def hf_folder(tmp_path):
    return save_hf_llava(tmp_path / "hf")


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_a_tensor_of_the_wrong_shape_is_named(hf_folder):
    def shrink(state):
        key = next(k for k in state if "linear_1.weight" in k)
        state[key] = state[key][:, :16].contiguous()

    _rewrite(hf_folder, shrink)
    with pytest.raises(FormatError, match=r"multi_modal_projector\.linear_1\.weight"):
        load_any(hf_folder)


def test_a_tensor_of_the_wrong_dtype_is_named_with_its_file(hf_folder):
    def as_int(state):
        key = next(k for k in state if "linear_2.bias" in k)
        state[key] = state[key].to(torch.int64)

    _rewrite(hf_folder, as_int)
    with pytest.raises(FormatError, match=r"model\.safetensors: tensor .*linear_2\.bias has dtype I64"):
        load_any(hf_folder)


def test_a_missing_tensor_is_an_error_not_a_random_init(hf_folder):
    _rewrite(hf_folder, lambda state: state.pop(next(k for k in state if k.endswith("post_layernorm.weight"))))
    with pytest.raises(FormatError, match=r"does not match its config.json .*missing keys: .*post_layernorm\.weight"):
        load_any(hf_folder)


def test_a_missing_shard_is_named(tmp_path):
    import transformers

    folder = save_hf_llava(tmp_path / "hf")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja"):
        if (folder / name).is_file():
            (sharded / name).write_bytes((folder / name).read_bytes())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(FormatError, match=rf"shard\(s\) {shards[1].name} listed in model.safetensors.index.json are missing"):
        load_any(sharded)


def test_an_unknown_layout_lists_what_was_looked_for(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(FormatError, match=r"not a model folder of a known layout \(looked for .*hf-llava: config.json with model_type 'llava'"):
        load_any(tmp_path / "m")


def test_a_llava_original_tensor_of_the_wrong_shape_is_named(tmp_path):
    from test_formats_llava_original import write_original

    folder, _, _ = write_original(tmp_path)
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state["model.mm_projector.2.weight"] = state["model.mm_projector.2.weight"][:8].contiguous()
    save_file(state, str(path))
    with pytest.raises(FormatError, match=r"tensor connector\.mlp\.2\.weight has shape \(8, 32\), the config implies \(32, 32\)"):
        load_any(folder)
