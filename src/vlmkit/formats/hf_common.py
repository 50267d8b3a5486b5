"""What the transformers-layout formats (hf-llava, hf-blip2) share: loading a transformers class with
every tensor accounted for, the prompt settings file, and the processor's parts.

Besides transformers' own files, an exported folder holds ``vlmkit_prompt.json`` (template name,
system prompt, max length): the three settings a transformers folder has no field for. Other engines
ignore it; without it (a folder from elsewhere) the folder's Jinja chat template is used as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

from vlmkit.formats.base import FormatError, check_tensor_headers, read_json, safetensors_files
from vlmkit.processing.templates import TEMPLATES, FormatTemplate

PROMPT_FILE = "vlmkit_prompt.json"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def model_type(folder: Path) -> str | None:
    """``model_type`` of ``folder/config.json`` (``None`` when there is no readable one)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def load_hf_model(cls: type, folder: Path, dtype: str | None) -> tuple[Any, Any]:
    """``cls.from_pretrained(folder)`` from safetensors only, refusing what transformers would only
    warn about (a tensor missing from the files is randomly initialised there; here it is an error).

    Returns ``(model, config)``.

    Raises:
        FormatError: no weights, a missing shard, a non-float tensor, or a missing, unexpected or
            misshapen tensor (names it).
    """
    config = transformers.AutoConfig.from_pretrained(folder)
    check_tensor_headers(safetensors_files(folder))
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {"dtype": "auto"}
    try:
        # mismatched sizes are reported (and raised below, naming the tensors) rather than raised by
        # transformers with a message that points at its log
        model, info = cls.from_pretrained(folder, config=config, use_safetensors=True, output_loading_info=True,
                                          ignore_mismatched_sizes=True, **kwargs)
    except (RuntimeError, ValueError, OSError) as exc:
        raise FormatError(f"{folder}: transformers could not load it as {cls.__name__}: {str(exc).splitlines()[0]}") from None
    problems = []
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = [_describe(k) for k in info.get(what) or []]
        if found:
            problems.append(f"{what.replace('_', ' ')}: {', '.join(found[:6])}{' ...' if len(found) > 6 else ''}")
    if problems:
        raise FormatError(f"{folder} does not match its config.json ({cls.__name__}): {'; '.join(problems)}")
    return model, config


def _describe(entry: Any) -> str:
    """A loading-info entry: a key, or ``(key, checkpoint shape, model shape)`` for a mismatch."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        key, have, want = entry
        return f"{key} (shape {tuple(have)} in the checkpoint, {tuple(want)} from config.json)"
    return str(entry)


def check_image_token(folder: Path, hf_processor: Any, image_token_id: int | None) -> None:
    """The processor's image token is ``<image>`` (vlmkit's placeholder) with the config's id.

    Raises:
        FormatError: names the token, its id and the config's.
    """
    token = str(getattr(hf_processor, "image_token", "<image>"))
    found = hf_processor.tokenizer.convert_tokens_to_ids(token)
    if token != "<image>" or image_token_id is None or found != image_token_id:
        raise FormatError(f"{folder}: the image token is {token!r} with id {found}, config.json says image_token_id="
                          f"{image_token_id}; vlmkit needs '<image>' with the config's id")


def dtype_name(model: Any) -> str:
    """vlmkit's name of a transformers model's floating dtype."""
    return DTYPE_NAMES.get(next(model.parameters()).dtype, "float32")


def write_prompt_settings(folder: Path, processor: Any) -> None:
    (folder / PROMPT_FILE).write_text(json.dumps({
        "template": processor.template.name, "system_prompt": processor.system_prompt, "max_length": processor.max_length,
    }, indent=2))


def prompt_settings(folder: Path, chat_template: str | None, tokenizer: Any, default_max_length: int,
                    fallback: str | None = None) -> dict[str, Any]:
    """``template`` / ``system_prompt`` / ``max_length`` for a transformers folder: from
    ``vlmkit_prompt.json`` when vlmkit wrote it, else the folder's own chat template (``tokenizer``),
    else the named template ``fallback`` (BLIP-2's processors build prompts without one).

    Raises:
        FormatError: none of them is there (nothing says how prompts are written).
    """
    path = folder / PROMPT_FILE
    if path.is_file():
        data = read_json(path)
        if data.get("template") not in TEMPLATES:
            raise FormatError(f"{path}: template {data.get('template')!r} is not a vlmkit template ({', '.join(TEMPLATES.names())})")
        return {"template": data["template"], "system_prompt": data.get("system_prompt"),
                "max_length": int(data.get("max_length") or default_max_length)}
    if chat_template:
        tokenizer.chat_template = chat_template
        return {"template": "tokenizer", "system_prompt": None, "max_length": default_max_length}
    if fallback:
        return {"template": fallback, "system_prompt": None, "max_length": default_max_length}
    raise FormatError(f"{folder} has neither a chat template nor {PROMPT_FILE}; vlmkit cannot tell how its prompts are written")


def exported_chat_template(processor: Any) -> str:
    """The Jinja chat template that renders exactly the prompts ``processor`` encodes: the named
    template with the processor's system prompt as its default system message."""
    from vlmkit.processing.jinja import chat_template_jinja

    named = isinstance(processor.template, FormatTemplate)
    return chat_template_jinja(processor.template, processor.tokenizer, processor.system_prompt if named else None)


def generation_config(processor: Any) -> transformers.GenerationConfig:
    """Stop and pad tokens as vlmkit generates: the template's single-token stop strings plus EOS."""
    stops = processor.stop_token_ids()
    return transformers.GenerationConfig(
        eos_token_id=stops if len(stops) > 1 else (stops[0] if stops else None),
        pad_token_id=processor.pad_token_id, bos_token_id=processor.tokenizer.bos_token_id,
    )
