"""What a finished stage leaves on disk: exactly the parts it trained.

::

    stages/<name>/connector.safetensors     connector trained (full): LLaVA's mm_projector
    stages/<name>/fusion.safetensors        cross-attention blocks trained (full)
    stages/<name>/vision/, language/        a part trained in full (transformers format)
    stages/<name>/adapters/<part>/          a part trained with LoRA (peft format), merged afterwards;
                                            for the language part also its task heads (heads.safetensors)
    stages/<name>/stage.json                written last: the stage is complete

Re-applying the outputs of completed stages, in order, to a freshly built model reproduces the
model those stages produced; that is how a later run resumes.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import transformers

from vlmkit.fileio import atomic_directory, quiet_hf_progress, save_tensors, write_json_atomic
from vlmkit.models.build import load_connector
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.training.lora import load_lora, merge_lora, save_lora
from vlmkit.training.trainer import StageResult

DONE_FILE = "stage.json"
TENSOR_PARTS = ("connector", "fusion")  # plain modules saved as one safetensors file


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / DONE_FILE).is_file()


def save_stage_output(model: VisionLanguageModel, policy: dict[str, str], folder: str | Path, result: StageResult) -> None:
    """Save the trained parts (see module docstring), merge LoRA adapters, then mark the stage done."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, mode in policy.items():
        part = getattr(model, name)
        if mode == "lora":
            with atomic_directory(folder / "adapters" / name) as tmp:
                save_lora(part, tmp)
                if name == "language":
                    part.save_heads(tmp)
            merge_lora(part)
        elif mode == "full" and name in TENSOR_PARTS:
            state = part.state_dict()
            if state:
                save_tensors(state, folder / f"{name}.safetensors")
        elif mode == "full":
            with atomic_directory(folder / name) as tmp, quiet_hf_progress():
                (part.tower if name == "vision" else part).save_pretrained(tmp)
    summary = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in ("losses", "model")}
    write_json_atomic(folder / DONE_FILE, {"policy": policy, **summary})


def apply_stage_output(model: VisionLanguageModel, folder: str | Path) -> None:
    """Load a completed stage's trained parts into ``model`` (LoRA adapters are merged)."""
    folder = Path(folder)
    policy = json.loads((folder / DONE_FILE).read_text())["policy"]
    with quiet_hf_progress():
        for name, mode in policy.items():
            part = getattr(model, name)
            if mode == "lora":
                load_lora(part, folder / "adapters" / name)
                merge_lora(part)
                part.load_heads(folder / "adapters" / name)
            elif mode == "full" and name in TENSOR_PARTS:
                if (folder / f"{name}.safetensors").is_file():
                    load_connector(part, folder / f"{name}.safetensors")
            elif mode == "full" and name == "vision":
                cls = getattr(transformers, part.spec.model_class)
                part.tower = cls.from_pretrained(folder / "vision", dtype=part.dtype, use_safetensors=True)
            elif mode == "full":
                part.load_pretrained(folder / "language")
