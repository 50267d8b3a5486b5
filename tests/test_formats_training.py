"""Training from an imported model and exporting runs: `model.pretrained` (any format), LoRA stages
exported as full models, `train.export`, and the `vlmkit export` command."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import tiny_recipe_dict
from formats_helpers import hf_inputs, save_hf_llava
from vlmkit.cli import main
from vlmkit.config import ConfigError, from_dict, RecipeConfig
from vlmkit.formats import load_any
from vlmkit.training.run import run_training


def _logits(model, inputs):
    with torch.no_grad():
        return model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits


def test_lora_fine_tuning_of_an_hf_llava_folder_exports_a_folder_transformers_loads(llava_data, tmp_path):
    source = save_hf_llava(tmp_path / "hf")
    recipe = tiny_recipe_dict(llava_data, tmp_path / "run")
    recipe["model"] = {"pretrained": str(source)}
    recipe["stages"] = [{"name": "instruct", "policy": {"connector": "full", "language": "lora"},
                         "data": {"source": "llava_json", "path": str(llava_data)}, "max_steps": 6, "batch_size": 4,
                         "lr": 1e-2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}]
    recipe["train"]["export"] = ["hf-llava"]
    summary = run_training(from_dict(RecipeConfig, recipe))
    losses = [row for row in (tmp_path / "run" / "stages" / "instruct" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) >= 1
    exported = summary.exports["hf-llava"]
    hf = transformers.AutoModelForImageTextToText.from_pretrained(exported).eval()
    inputs = hf_inputs(exported)
    trained = load_any(summary.model_dir).model
    assert (_logits(trained, inputs) - hf(**inputs).logits).abs().max().item() <= 1e-5
    # the fine-tuning changed the model: the source folder's logits differ
    original = transformers.AutoModelForImageTextToText.from_pretrained(source).eval()
    assert (original(**inputs).logits - hf(**inputs).logits).abs().max().item() > 1e-3


def test_a_lora_stage_folder_exports_as_the_full_model_and_a_bad_format_is_refused_before_training(llava_data, tmp_path, capsys):
    recipe = from_dict(RecipeConfig, tiny_recipe_dict(llava_data, tmp_path / "run"))
    summary = run_training(recipe)
    stage = tmp_path / "run" / "stages" / "instruct"
    assert (stage / "adapters" / "language" / "adapter_model.safetensors").is_file()
    assert main(["export", "--format", "hf-llava", str(stage), str(tmp_path / "exp")]) == 0
    assert "adapters merged" in capsys.readouterr().out
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "exp").eval()
    inputs = hf_inputs(tmp_path / "exp")
    full = load_any(summary.model_dir).model
    assert (_logits(full, inputs) - hf(**inputs).logits).abs().max().item() <= 1e-5
    # the align stage alone: the connector it trained, the language model untouched
    assert main(["export", "--format", "vlmkit", str(tmp_path / "run"), str(tmp_path / "align"), "--stage", "align"]) == 0
    align = load_any(tmp_path / "align").model
    q = lambda m: m.language.hf_model.model.layers[0].self_attn.q_proj.weight  # noqa: E731  (LoRA-adapted in instruct)
    assert not torch.equal(q(align), q(full))
    from vlmkit.fileio import load_tensors

    trained = load_tensors(tmp_path / "run" / "stages" / "align" / "connector.safetensors")
    assert all(torch.equal(t, align.connector.state_dict()[k]) for k, t in trained.items())

    bad = tiny_recipe_dict(llava_data, tmp_path / "bad")
    bad["model"]["connector"] = {"type": "mlp2x_gelu", "options": {"merge": 2}}
    bad["train"]["export"] = ["hf-llava"]
    with pytest.raises(ConfigError, match=r"train.export: hf-llava cannot express this model:\n  connector: mlp2x_gelu with merge=2"):
        run_training(from_dict(RecipeConfig, bad))
    assert not (tmp_path / "bad" / "stages").exists()


def test_unknown_export_format_is_a_config_error(llava_data, tmp_path):
    bad = tiny_recipe_dict(llava_data, tmp_path / "bad")
    bad["train"]["export"] = ["onnx"]
    with pytest.raises(ConfigError, match="train.export='onnx' is not valid; choose one of 'hf-blip2', 'hf-llava', 'llava-original'"):
        from_dict(RecipeConfig, bad)


def test_the_export_command_refuses_an_inexpressible_model_and_leaves_no_folder(build_tiny, tmp_path, capsys):
    from conftest import tiny_model_config
    from vlmkit.formats import save_model

    model, processor = build_tiny(encoder="bit")
    src = save_model(model, processor, tiny_model_config(encoder="bit"), tmp_path / "m")
    assert main(["export", "--format", "hf-llava", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "vision: the bit tower returns feature maps" in err and "formats that can hold it: vlmkit" in err
    assert not (tmp_path / "out").exists()
    assert main(["export", "--format", "hf-llava", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.npz").write_bytes(b"x")
    assert main(["export", "--format", "hf-llava", str(tmp_path / "junk"), str(tmp_path / "out")]) == 2
    assert "is not a model folder of a known layout (looked for" in capsys.readouterr().err


def test_chat_and_eval_read_a_transformers_folder(tmp_path, capsys):
    from formats_helpers import image

    folder = save_hf_llava(tmp_path / "hf")
    image(4).save(tmp_path / "q.png")
    assert main(["chat", "--model", str(folder), "--image", str(tmp_path / "q.png"), "--max-new-tokens", "3", "what", "shape?"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["eval", "--model", str(folder), "--limit", "8", "--batch-size", "4", "--out", str(tmp_path / "ev")]) == 0
    assert "easy-VQA test: accuracy" in capsys.readouterr().out
    assert main(["list", "formats"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("hf-llava", "hf-blip2", "llava-original", "vlmkit"))
