"""Shared fixtures: tiny tokenizers, tiny model configs, images made in the test. Nothing is downloaded.

Trained-quality assertions go through :func:`check_quality`, and seeded tests take their seeds from
:func:`seeded`, so the suite can be re-run on other seeds (``VLMKIT_TEST_SEED=N``) and kernel paths
(``ATEN_CPU_CAPABILITY=avx2`` ...) with every quality figure recorded (``VLMKIT_QUALITY_LOG=FILE``);
``python bench/test_quality.py`` does that and prints each figure's distribution next to its bound.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from PIL import Image

from vlmkit.config import ConnectorConfig, LanguageConfig, ModelConfig, TokenizerConfig, VisionConfig
from vlmkit.processing.tokenizer import train_bpe_tokenizer
from vlmkit.recipes.twin import TINY_LANGUAGE as TINY_LM, TINY_VISION  # noqa: F401  (the tiny shapes, shared with recipe twins)

torch.set_num_threads(int(os.environ.get("VLMKIT_TEST_THREADS", "2")))

#: Added to every seed the suite uses (weights, data order): ``VLMKIT_TEST_SEED=3 pytest`` is another draw.
TEST_SEED = int(os.environ.get("VLMKIT_TEST_SEED", "0"))


def seeded(seed: int = 0) -> int:
    """Seed torch with ``seed + VLMKIT_TEST_SEED`` and return that seed (for recipes and samplers)."""
    torch.manual_seed(seed + TEST_SEED)
    return seed + TEST_SEED


def check_quality(name: str, value: float, *, below: float | None = None, above: float | None = None) -> None:
    """Assert a trained-quality figure (a loss ratio, an accuracy, a score margin) against its bound.

    With ``VLMKIT_QUALITY_LOG=FILE`` the figure is also appended to FILE with the seed, kernel path and
    thread count it was measured under, which is where the distributions quoted beside each bound
    come from (``bench/test_quality.py``).
    """
    log = os.environ.get("VLMKIT_QUALITY_LOG")
    if log:
        row = {"name": name, "value": float(value), "below": below, "above": above, "seed": TEST_SEED,
               "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
        with open(log, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    if below is not None:
        assert value < below, f"{name}: {value:.4f} is not below {below}"
    if above is not None:
        assert value > above, f"{name}: {value:.4f} is not above {above}"

CORPUS = [
    "what color is the shape? blue", "is there a red circle in the image? yes", "A green triangle.",
    "Describe the image briefly.", "USER: ASSISTANT: system user assistant", "hello world, the quick brown fox",
    "what shape is present? rectangle", "no yes black gray teal brown yellow", "A chat between a curious user",
] * 20

#: answer vocabulary for encoder-only (classification) backbones in tests
TINY_ANSWERS = ["yes", "no", "blue", "red", "circle"]

@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A real byte-level BPE tokenizer trained on a tiny corpus (fresh copy per use via ``tokenizer``)."""
    return train_bpe_tokenizer(CORPUS, 400)


@pytest.fixture
def tokenizer(bpe_tokenizer):
    import copy

    return copy.deepcopy(bpe_tokenizer)


def tiny_model_config(
    encoder: str = "clip", backbone: str = "llama", connector: str = "mlp2x_gelu", template: str = "chatml", **kw
) -> ModelConfig:
    """A ModelConfig of a tiny random model (hidden 32, 2 layers) with a 32-px image."""
    return ModelConfig(
        vision=VisionConfig(encoder=encoder, config=dict(TINY_VISION[encoder]), feature_layer=kw.pop("feature_layer", -1),
                            image_size=32, drop_cls=kw.pop("drop_cls", True)),
        connector=ConnectorConfig(type=connector, options=kw.pop("connector_options", {})),
        language=LanguageConfig(backbone=backbone, config=dict(TINY_LM[backbone]), tokenizer=TokenizerConfig()),
        answers=kw.pop("answers", list(TINY_ANSWERS) if backbone == "roberta" else []),
        template=template,
        max_length=kw.pop("max_length", 256),
        system_prompt=kw.pop("system_prompt", ""),
        **kw,
    )


@pytest.fixture
def build_tiny(tokenizer):
    """``build_tiny(**kw) -> (model, processor)`` with a seeded init."""
    from vlmkit.models.build import build_model

    def make(seed: int = 0, **kw):
        seeded(seed)
        return build_model(tiny_model_config(**kw), tokenizer=tokenizer)

    return make


def make_image(path: Path, color=(200, 30, 30), size=(40, 32), mode: str = "RGB") -> Path:
    img = Image.new("RGB", size, color)
    img.paste((20, 200, 20), (5, 5, 15, 15))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30), (240, 240, 20)]):
        make_image(folder / f"img{i}.png", color=color)
    return folder


COLOR_NAMES = {"red": (210, 30, 30), "blue": (30, 30, 210), "green": (30, 190, 30), "yellow": (235, 235, 20)}


def write_llava_data(folder: Path, per_color: int = 4, caption: bool = False) -> Path:
    """A LLaVA conversation JSON over coloured images: ``folder/data.json`` (images in ``folder/img``)."""
    import json

    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLOR_NAMES.items():
        for k in range(per_color):
            file = f"{name}{k}.png"
            make_image(folder / "img" / file, color=rgb, size=(32 + 4 * k, 32))
            human = "<image>\nDescribe the image." if caption else "<image>\nwhat color is the image?"
            answer = f"a {name} image" if caption else name
            rows.append({"id": f"{name}-{k}", "image": f"img/{file}",
                         "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]})
    path = folder / "data.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def llava_data(tmp_path) -> Path:
    return write_llava_data(tmp_path / "data")


def tiny_recipe_dict(data_path: Path, out: Path, stages: list[dict] | None = None) -> dict:
    """A complete recipe (as a dict) of a tiny CLIP + Llama model trained on ``data_path``."""
    model = {
        "vision": {"encoder": "clip", "config": dict(TINY_VISION["clip"]), "image_size": 32, "feature_layer": -2},
        "connector": {"type": "mlp2x_gelu"},
        "language": {"backbone": "llama", "config": dict(TINY_LM["llama"]), "tokenizer": {"train_vocab_size": 300}},
        "template": "chatml", "system_prompt": "", "max_length": 128,
    }
    data = {"source": "llava_json", "path": str(data_path)}
    stages = stages or [
        {"name": "align", "policy": {"connector": "full"}, "data": {**data, "template": "plain"}, "max_steps": 4, "batch_size": 4, "lr": 1e-2},
        {"name": "instruct", "policy": {"connector": "full", "language": "lora"}, "data": data, "max_steps": 6, "batch_size": 4,
         "lr": 1e-2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    ]
    return {"name": "tiny", "model": model, "stages": stages,
            "train": {"seed": TEST_SEED, "output_dir": str(out), "progress": False, "threads": torch.get_num_threads()}}


def train_fixed_batch(model, batch: dict, steps: int, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps on one batch over the parameters that require grad; the losses before
    each step. The model is left in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
    model.eval()
    return losses


def kept_for_backward(run) -> tuple[int, object]:
    """``(bytes of the tensors autograd saves while run() computes, run()'s result)``: how much an
    activation-checkpointed forward keeps compared with a plain one."""
    kept: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
        result = run()
    return sum(kept), result


def assert_checkpointing_recomputes(kept_and_grads, *, rtol: float, atol: float) -> None:
    """``kept_and_grads(checkpointing) -> (bytes kept for backward, gradients)`` on a fresh model: with
    checkpointing under 60% of the bytes are kept, and the gradients are the plain run's."""
    plain, plain_grads = kept_and_grads(False)
    ckpt, ckpt_grads = kept_and_grads(True)
    assert ckpt < 0.6 * plain, (ckpt, plain)
    for a, b in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
