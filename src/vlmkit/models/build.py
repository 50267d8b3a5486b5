"""The only place that turns configuration into objects: model + processor.

Saved folders (vlmkit's own and the other checkpoint formats) are read and written in
:mod:`vlmkit.formats`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import ModelConfig
from vlmkit.fileio import load_tensors
from vlmkit.models.connectors import CONNECTORS
from vlmkit.models.fusion import FUSIONS
from vlmkit.models.language import BACKBONES, BackboneSpec, build_language_model, resolve_backbone
from vlmkit.models.sources import resolve_pretrained
from vlmkit.models.vision import build_vision_encoder
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.image import ImageTransform
from vlmkit.processing.processor import VLMProcessor
from vlmkit.processing.templates import TEMPLATES, resolve_template, template_markers
from vlmkit.processing.tokenizer import load_tokenizer, prepare_tokenizer, train_bpe_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tokenizer(cfg: ModelConfig, texts: Iterable[str] | None = None) -> Any:
    """The tokenizer the model config asks for.

    Raises:
        ValueError: a from-scratch tokenizer is requested without training text, or no source is given.
    """
    tok_cfg = cfg.language.tokenizer
    if tok_cfg.path:
        tokenizer = load_tokenizer(tok_cfg.path, cfg.trust_remote_code)
    elif tok_cfg.train_vocab_size:
        if texts is None:
            raise ValueError("model.language.tokenizer.train_vocab_size is set but no training text was given to train it on")
        tokenizer = train_bpe_tokenizer(texts, tok_cfg.train_vocab_size, template_markers(cfg.template))
    elif cfg.language.pretrained:
        tokenizer = load_tokenizer(resolve_pretrained(cfg.language.pretrained), cfg.trust_remote_code)
    else:
        raise ValueError(
            "model.language has no tokenizer source: set model.language.pretrained, "
            "model.language.tokenizer.path, or model.language.tokenizer.train_vocab_size"
        )
    return prepare_tokenizer(tokenizer)


def backbone_spec(cfg: ModelConfig) -> BackboneSpec:
    """The backbone family ``cfg`` builds, with ``backbone: auto`` resolved from the checkpoint's (or
    the config's) model_type (see :func:`vlmkit.models.language.resolve_backbone`).

    Raises:
        RegistryError: an unknown family id.
        ValueError: ``auto`` without a model_type to go by.
    """
    pretrained = resolve_pretrained(cfg.language.pretrained)
    return BACKBONES.get(resolve_backbone(cfg.language.backbone, pretrained, cfg.language.config, cfg.trust_remote_code))


def build_model(
    cfg: ModelConfig, tokenizer: Any | None = None, tokenizer_texts: Iterable[str] | None = None
) -> tuple[VisionLanguageModel, VLMProcessor]:
    """Build the model and its processor from ``cfg``.

    Args:
        tokenizer: use this tokenizer instead of the one ``cfg`` names.
        tokenizer_texts: text to train a tokenizer on when ``cfg`` asks for one.

    Raises:
        RegistryError: unknown encoder, connector, backbone or template id (lists valid ids).
        ValueError: inconsistent pieces (e.g. an unknown config key of a Hugging Face config).
    """
    dtype = DTYPES[cfg.dtype]
    tokenizer = prepare_tokenizer(tokenizer) if tokenizer is not None else build_tokenizer(cfg, tokenizer_texts)
    spec = backbone_spec(cfg)
    v = cfg.vision
    vision = build_vision_encoder(
        v.encoder, v.pretrained, v.config, v.feature_layer, v.drop_cls, v.image_size, v.image_mean, v.image_std,
        dtype=dtype, trust_remote_code=cfg.trust_remote_code,
    )
    special = {k: getattr(tokenizer, k) for k in ("pad_token_id", "eos_token_id", "bos_token_id") if getattr(tokenizer, k, None) is not None}
    language = build_language_model(
        spec.name, resolve_pretrained(cfg.language.pretrained), cfg.language.config, vocab_size=len(tokenizer),
        dtype=dtype, trust_remote_code=cfg.trust_remote_code, preset=cfg.language.preset, special_tokens=special,
        answers=cfg.answers,
    )
    connector = _build_part(CONNECTORS, "connector", cfg.connector.type, cfg.connector.options,
                            vision.hidden_size, language.hidden_size, vision.num_tokens)
    _check_bridge(connector, cfg.connector.type, vision.hidden_size, language.hidden_size, vision.num_tokens)
    connector.to(dtype)
    if cfg.connector.pretrained:
        load_connector(connector, cfg.connector.pretrained, cfg.connector.type, cfg.allow_pickle)
    fusion = _build_part(FUSIONS, "fusion", cfg.fusion.type, cfg.fusion.options, language)
    if cfg.fusion.pretrained:
        load_connector(fusion, cfg.fusion.pretrained)
    template = _template(cfg.template, tokenizer, spec.name, spec.default_template)
    transform = ImageTransform(vision.image_size, vision.image_mean, vision.image_std, v.image_aspect)
    processor = VLMProcessor(
        tokenizer, template, transform, fusion.tokens_per_image(connector.num_output_tokens), cfg.max_length,
        cfg.system_prompt, layout=spec.kind, answers=cfg.answers,
    )
    model = VisionLanguageModel(vision, connector, language, processor.image_token_id, fusion)
    return model, processor


def _template(name: str, tokenizer: Any, backbone: str, backbone_default: str) -> Any:
    """The chat template ``name`` resolves to (``auto``: the tokenizer's own, else the family default).

    Raises:
        ValueError: ``auto`` falls to a family whose default is the tokenizer's own template, but the
            tokenizer has none; said at build time rather than at the first sample.
    """
    template = resolve_template(name, tokenizer, backbone_default)
    if template.name == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        named = ", ".join(n for n in TEMPLATES.names() if n != "tokenizer")
        why = f"the {backbone!r} backbone's default is the tokenizer's own template" if name == "auto" else "model.template=tokenizer"
        raise ValueError(f"{why}, but this tokenizer has no chat_template; set model.template to one of {named}")
    return template


def _build_part(registry, key: str, name: str, options: dict[str, Any], *args: Any) -> Any:
    """``registry[name](*args, **options)``; options that do not fit name the recipe key."""
    factory = registry.get(name)
    try:
        return factory(*args, **options)
    except TypeError as exc:
        raise ValueError(f"model.{key}.options {options} do not fit {key} {name!r}: {exc}") from None


def _check_bridge(connector: torch.nn.Module, name: str, vision_dim: int, language_dim: int, num_tokens: int) -> None:
    """Build-time check, on one zero image's tokens, that the connector maps ``(N, vision width)`` to
    ``(num_output_tokens, language width)``, instead of failing later inside a matmul or splice.

    Raises:
        ValueError: naming the connector, both widths and the token counts.
    """
    first = next(connector.parameters(), None)
    # on the parameters' device: a model built with empty (meta) weights is checked by shapes alone
    probe = torch.zeros(1, num_tokens, vision_dim, device=first.device if first is not None else "cpu")
    training = connector.training
    connector.eval()  # no batch-norm statistics change from the probe
    try:
        with torch.no_grad():
            out = connector(probe.to(next(connector.parameters(), probe).dtype))
    except RuntimeError as exc:
        raise ValueError(
            f"connector {name!r} cannot bridge the vision width {vision_dim} to the language hidden size {language_dim}: {exc}"
        ) from None
    finally:
        connector.train(training)
    width = out.shape[-1]
    if out.shape[1] != connector.num_output_tokens:
        raise ValueError(
            f"connector {name!r} emits {out.shape[1]} tokens for {num_tokens} vision tokens but declares "
            f"num_output_tokens={connector.num_output_tokens}"
        )
    if width != language_dim:
        raise ValueError(
            f"connector {name!r} maps the vision width {vision_dim} to {width}, but the language model's hidden size is "
            f"{language_dim}; choose a projecting connector (e.g. mlp2x_gelu) or matching sizes"
        )


def load_connector(connector: torch.nn.Module, path: str | Path, kind: str | None = None, allow_pickle: bool = False) -> None:
    """Load connector (or fusion) weights (strict): a vlmkit ``connector.safetensors``, or an original
    LLaVA stage-1 projector (``mm_projector.bin`` / ``.safetensors`` with ``model.mm_projector.*``
    names; a pickle only with ``allow_pickle``) for connector type ``kind``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the weights do not fit this connector (names the missing/unexpected keys), or a
            pickle without the opt-in.
    """
    from vlmkit.formats.llava_original import is_projector_file, read_projector

    path = Path(path)
    if is_projector_file(path):
        state = read_projector(path, kind or "", allow_pickle)
    else:
        state = load_tensors(path)
    missing, unexpected = connector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the {type(connector).__name__}: missing {missing}, unexpected {unexpected}")
