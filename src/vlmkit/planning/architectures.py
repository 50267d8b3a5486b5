"""Architectures of the hub checkpoints vlmkit's recipes name, so models can be sized without a download.

Each entry is the part of the checkpoint's ``config.json`` that fixes the parameter shapes (for a
composite checkpoint such as CLIP or BLIP-2, its ``vision_config``), plus the length of its tokenizer
(vlmkit adds ``<image>`` to it, which grows the embeddings when the tokenizer already fills them).
Values are written from the published ``config.json`` files on the Hugging Face Hub (cited per entry);
the parameter counts they imply are checked in ``tests/test_plan.py`` against the published totals.

:func:`architecture_config` answers for a hub id from this table and for a local folder from its own
``config.json``; :func:`offline_model_config` rewrites a recipe's model section so that
:func:`vlmkit.models.build.build_model` builds the same shapes from configs alone.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmkit.config import ConfigError, ModelConfig
from vlmkit.models.hf_config import checkpoint_tensor_names
from vlmkit.registry import Registry


@dataclass(frozen=True)
class KnownArchitecture:
    """One hub checkpoint's shapes.

    Attributes:
        hub_id: the repository id (``openai/clip-vit-large-patch14-336``).
        role: ``vision`` (a tower; ``config`` is its vision config) or ``language``.
        config: the shape fields of its ``config.json`` (``model_type`` included).
        tokenizer_size: ``len(tokenizer)`` of the checkpoint's tokenizer (language models); vlmkit adds
            ``<image>``, so the embeddings hold ``max(vocab_size, tokenizer_size + 1)`` rows.
        source: where the values come from.
    """

    hub_id: str
    role: str
    config: dict[str, Any]
    source: str
    tokenizer_size: int | None = None
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.role not in ("vision", "language"):
            raise ValueError(f"architecture {self.hub_id!r}: role {self.role!r} is not vision or language")
        if self.role == "language" and self.tokenizer_size is None:
            raise ValueError(f"architecture {self.hub_id!r}: a language model needs tokenizer_size")


KNOWN_ARCHITECTURES: Registry[KnownArchitecture] = Registry("known architecture")

_HUB = "https://huggingface.co/{}/blob/main/config.json"


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, positions: int, **extra: Any) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "max_position_embeddings": positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            **extra}


def _clip_vision(image_size: int) -> dict[str, Any]:
    # ViT-L/14: the vision_config of the CLIP checkpoint
    return {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": image_size, "patch_size": 14, "projection_dim": 768,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def _eva_vit_g() -> dict[str, Any]:
    # BLIP-2's EVA ViT-g/14 with its last layer removed (39 of 40), as in every BLIP-2 checkpoint's vision_config
    return {"model_type": "blip_2_vision_model", "hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
            "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "qkv_bias": True, "hidden_act": "gelu",
            "layer_norm_eps": 1e-6}


for _arch in (
    KnownArchitecture("openai/clip-vit-large-patch14-336", "vision", _clip_vision(336), _HUB.format("openai/clip-vit-large-patch14-336"),
                      notes="LLaVA-1.5's tower: 577 tokens (24x24 patches + CLS)"),
    KnownArchitecture("openai/clip-vit-large-patch14", "vision", _clip_vision(224), _HUB.format("openai/clip-vit-large-patch14"),
                      notes="LLaVA-1's tower: 257 tokens"),
    KnownArchitecture(
        "google/siglip-so400m-patch14-384", "vision",
        {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
         "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh",
         "layer_norm_eps": 1e-6},
        _HUB.format("google/siglip-so400m-patch14-384"), notes="729 tokens (27x27 patches), no CLS"),
    KnownArchitecture(
        # BLIP-2's EVA ViT-g/14 (vision_config of Salesforce/blip2-opt-2.7b; the same tower in every BLIP-2)
        "Salesforce/blip2-opt-2.7b", "vision",
        _eva_vit_g(),
        _HUB.format("Salesforce/blip2-opt-2.7b"), notes="the vision tower only (EVA ViT-g, 257 tokens)"),
    KnownArchitecture(
        # the same EVA ViT-g/14 (BLIP-2 FlanT5 checkpoints carry the vision_config of the OPT ones)
        "Salesforce/blip2-flan-t5-xl", "vision",
        _eva_vit_g(),
        _HUB.format("Salesforce/blip2-flan-t5-xl"), notes="the vision tower only (EVA ViT-g, 257 tokens)"),
    KnownArchitecture("meta-llama/Llama-2-7b-chat-hf", "language", _llama(4096, 11008, 32, 32, 32, 32000, 4096),
                      _HUB.format("meta-llama/Llama-2-7b-chat-hf"), tokenizer_size=32000, notes="NeVA's language model"),
    KnownArchitecture("meta-llama/Llama-2-13b-chat-hf", "language", _llama(5120, 13824, 40, 40, 40, 32000, 4096),
                      _HUB.format("meta-llama/Llama-2-13b-chat-hf"), tokenizer_size=32000),
    KnownArchitecture("lmsys/vicuna-7b-v1.5", "language", _llama(4096, 11008, 32, 32, 32, 32000, 4096),
                      _HUB.format("lmsys/vicuna-7b-v1.5"), tokenizer_size=32000),
    KnownArchitecture("lmsys/vicuna-13b-v1.5", "language", _llama(5120, 13824, 40, 40, 40, 32000, 4096),
                      _HUB.format("lmsys/vicuna-13b-v1.5"), tokenizer_size=32000),
    KnownArchitecture("lmsys/vicuna-7b-v1.3", "language", _llama(4096, 11008, 32, 32, 32, 32000, 2048, rms_norm_eps=1e-6),
                      _HUB.format("lmsys/vicuna-7b-v1.3"), tokenizer_size=32000),
    KnownArchitecture(
        "meta-llama/Llama-3.1-8B-Instruct", "language",
        _llama(4096, 14336, 32, 32, 8, 128256, 131072, rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
        _HUB.format("meta-llama/Llama-3.1-8B-Instruct"), tokenizer_size=128256),
    KnownArchitecture("meta-llama/Meta-Llama-3-8B-Instruct", "language",
                      _llama(4096, 14336, 32, 32, 8, 128256, 8192, rope_theta=500000.0),
                      _HUB.format("meta-llama/Meta-Llama-3-8B-Instruct"), tokenizer_size=128256),
    KnownArchitecture(
        "microsoft/phi-2", "language",
        {"model_type": "phi", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 51200, "max_position_embeddings": 2048,
         "partial_rotary_factor": 0.4, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "tie_word_embeddings": False},
        _HUB.format("microsoft/phi-2"), tokenizer_size=50295),
    KnownArchitecture(
        "facebook/opt-2.7b", "language",
        {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
         "vocab_size": 50272, "max_position_embeddings": 2048, "word_embed_proj_dim": 2560, "do_layer_norm_before": True,
         "tie_word_embeddings": True},
        _HUB.format("facebook/opt-2.7b"), tokenizer_size=50265),
    KnownArchitecture(
        "google/flan-t5-xl", "language",
        {"model_type": "t5", "d_model": 2048, "d_ff": 5120, "d_kv": 64, "num_heads": 32, "num_layers": 24,
         "num_decoder_layers": 24, "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
         "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128},
        _HUB.format("google/flan-t5-xl"), tokenizer_size=32100),
):
    KNOWN_ARCHITECTURES.register(_arch.hub_id, _arch)


def is_local(source: str) -> bool:
    """Whether ``source`` names a local folder (rather than a hub id)."""
    return Path(source).is_dir()


def architecture_config(source: str, role: str) -> tuple[dict[str, Any], int | None]:
    """``(config fields, tokenizer length)`` of a pretrained ``source`` for ``role`` (vision or language),
    without weights: a local folder's ``config.json`` (its ``vision_config`` for a composite vision
    checkpoint), else the table entry of a hub id. The tokenizer length counts the ``<image>`` token
    vlmkit adds (None for towers, or a folder without ``tokenizer.json``).

    Raises:
        ConfigError: a hub id not in the table (lists the known ids), a table entry of the other role,
            or a folder without ``config.json``.
    """
    if is_local(source):
        path = Path(source) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{source} has no config.json to size the {role} model from")
        data = json.loads(path.read_text())
        if role == "vision" and "vision_config" in data:
            data = data["vision_config"]
        return data, _local_tokenizer_size(Path(source)) if role == "language" else None
    if source not in KNOWN_ARCHITECTURES:
        known = ", ".join(a for a in KNOWN_ARCHITECTURES if KNOWN_ARCHITECTURES.get(a).role == role)
        raise ConfigError(f"{source!r} is neither a local folder nor a {role} architecture vlmkit knows offline; "
                          f"known: {known}. Point the recipe at a local copy of the checkpoint (its config.json is enough)")
    arch = KNOWN_ARCHITECTURES.get(source)
    if arch.role != role:
        raise ConfigError(f"{source!r} is a {arch.role} checkpoint, not a {role} one")
    return copy.deepcopy(arch.config), (arch.tokenizer_size + 1 if arch.tokenizer_size is not None else None)


def _local_tokenizer_size(folder: Path) -> int | None:
    """The length of a local folder's ``tokenizer.json`` tokenizer once ``<image>`` is added, or None."""
    from vlmkit.processing.tokenizer import IMAGE_TOKEN

    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    vocab = (data.get("model") or {}).get("vocab")
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab or [])))
    added = data.get("added_tokens", [])
    ids |= {t["id"] for t in added}
    if not ids:
        return None
    return max(ids) + 1 + (0 if any(t.get("content") == IMAGE_TOKEN for t in added) else 1)


#: :data:`vlmkit.models.sources.GGUF_SCHEME` (that module imports torch, which a cache lookup does without)
_GGUF_SCHEME = "pypi-gguf:"
#: config fields that describe a checkpoint rather than its shapes
_NOT_SHAPES = ("architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "quantization_config")


def offline_model_config(cfg: ModelConfig) -> ModelConfig:
    """A copy of ``cfg`` whose vision tower and language model build from configs alone: each
    ``pretrained`` source becomes its architecture's config (recipe ``config`` fields still override it),
    and ``vocab_size`` is what the builder would size the embeddings to (grown for the tokens vlmkit adds
    to the tokenizer, ``<image>``). A from-scratch tokenizer (``train_vocab_size``) is assumed to reach
    its full size, as it does on a real training set. A whole saved model (``model.pretrained``) is
    replaced by its description first (:func:`saved_model_config`). Connector and fusion weights are not
    read: their shapes follow from their options.

    Raises:
        ConfigError: a source that is neither a folder nor in :data:`KNOWN_ARCHITECTURES`, a GGUF package
            source, or a saved model that is not a vlmkit model folder.
    """
    cfg = saved_model_config(cfg) if cfg.pretrained else cfg
    out = copy.deepcopy(cfg)
    out.connector.pretrained = out.fusion.pretrained = None
    if out.vision.pretrained:
        fields, _ = architecture_config(_plain_source(out.vision.pretrained, "model.vision.pretrained"), "vision")
        out.vision.config = {**_shape_fields(fields, keep_model_type=out.vision.encoder in ("auto", "automodel")), **out.vision.config}
        if out.vision.encoder == "auto":
            out.vision.encoder = _vision_family(fields)
        out.vision.pretrained = None
    lang = out.language
    tokens = _tokenizer_length(cfg)
    if lang.pretrained:
        fields, tokenizer_size = architecture_config(_plain_source(lang.pretrained, "model.language.pretrained"), "language")
        tokens = tokens or tokenizer_size
        lang.config = {**_shape_fields(fields, keep_model_type=lang.backbone in ("auto", "causal_lm")), **lang.config}
        if lang.backbone == "auto":
            from vlmkit.models.language import family_for_model_type

            lang.backbone = family_for_model_type(fields["model_type"])
        lang.pretrained = None
    if tokens is not None:  # the builder sizes embeddings to max(config vocabulary, tokenizer length)
        lang.config = {**lang.config, "vocab_size": max(int(lang.config.get("vocab_size", 0)), tokens)}
    return out


def _tokenizer_length(cfg: ModelConfig) -> int | None:
    """Length of the tokenizer ``cfg`` trains or names (``<image>`` included), None when it is the
    pretrained language model's own (sized from its architecture).

    Raises:
        ConfigError: ``tokenizer.path`` is a hub id (only local folders are read offline).
    """
    tok = cfg.language.tokenizer
    if tok.path:
        if not is_local(tok.path):
            raise ConfigError(f"model.language.tokenizer.path={tok.path!r} is not a local folder; vlmkit plan reads "
                              "tokenizers offline only")
        return _local_tokenizer_size(Path(tok.path))
    return tok.train_vocab_size  # a trained BPE reaches its full size on a real training set


def _plain_source(source: str, key: str) -> str:
    from vlmkit.models.sources import GGUF_SCHEME

    if source.startswith(GGUF_SCHEME):
        from vlmkit.models.sources import resolve_pretrained

        try:  # an installed package converts to a cached folder with a config.json
            return str(resolve_pretrained(source))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"{key}={source!r} cannot be sized offline: {exc}") from None
    return source


def _shape_fields(fields: dict[str, Any], keep_model_type: bool) -> dict[str, Any]:
    """``fields`` without checkpoint bookkeeping and without keys the model type's config class does
    not know (a saved config.json may carry some, e.g. ``unk_token_id``), which the builder would refuse."""
    import transformers

    drop = set(_NOT_SHAPES) | ({"model_type"} if not keep_model_type else set())
    model_type = fields.get("model_type", "")
    # (the lazy CONFIG_MAPPING answers `in` but not `get`)
    known = set(transformers.CONFIG_MAPPING[model_type]().to_dict()) if model_type in transformers.CONFIG_MAPPING else None
    return {k: v for k, v in fields.items() if k not in drop and (known is None or k in known)}


def _vision_family(fields: dict[str, Any]) -> str:
    from vlmkit.models.vision.towers import family_for_vision_config

    class _Config:  # family_for_vision_config reads only model_type
        model_type = fields.get("model_type", "")

    return family_for_vision_config(_Config())


def sizing_description(cfg: ModelConfig) -> dict[str, Any]:
    """Everything the parameter counts of ``cfg`` follow from, as plain JSON data, without importing
    torch or transformers: the model section, and for each pretrained source its shapes (the table
    entry of a hub id; for a local folder its ``config.json`` and the size and time of its tokenizer
    files). Two configurations with equal descriptions build equal parameter counts (with one
    transformers and vlmkit version), which is what a cache of the counts is keyed by.

    Raises:
        ConfigError: a hub id that is not in the table (as counting would).
    """
    import dataclasses

    sources: dict[str, Any] = {}
    for key, source, role in (("vision", cfg.vision.pretrained, "vision"), ("language", cfg.language.pretrained, "language"),
                              ("tokenizer", cfg.language.tokenizer.path, None), ("model", cfg.pretrained, None)):
        if not source:
            continue
        if is_local(source):
            folder = Path(source)
            config = folder / "config.json"
            stats = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.glob("*.json")) if f != config}
            sources[key] = {"config": config.read_text() if config.is_file() else None, "files": stats}
        elif role is not None and not source.startswith(_GGUF_SCHEME):
            fields, tokens = architecture_config(source, role)
            sources[key] = {"config": fields, "tokenizer": tokens}
        else:
            sources[key] = {"source": source}
    return {"model": dataclasses.asdict(cfg), "sources": sources}


#: the description file of a vlmkit model folder (:data:`vlmkit.formats.vlmkit.CONFIG_FILE`)
_SAVED_CONFIG = "vlmkit_config.json"


def saved_model_config(cfg: ModelConfig) -> ModelConfig:
    """The model a training run starts from when ``model.pretrained`` names a whole saved model: the
    description in the folder's ``vlmkit_config.json`` (parts as paths into the folder, each sized from
    its own ``config.json``), as `vlmkit train` reads it; ``cfg`` itself when there is none.

    Raises:
        ConfigError: not a folder, or a folder of another format (hf-llava, hf-blip2, original LLaVA:
            those are described by loading them).
    """
    if not cfg.pretrained:
        return cfg
    folder = Path(cfg.pretrained)
    if not (folder / _SAVED_CONFIG).is_file():
        what = "is not a folder" if not folder.is_dir() else f"has no {_SAVED_CONFIG} (another format)"
        raise ConfigError(f"model.pretrained={cfg.pretrained!r} {what}: vlmkit plan sizes a saved vlmkit model folder "
                          "(vlmkit export --format vlmkit converts the others); or describe its parts in model.vision / "
                          "model.language")
    from vlmkit.formats.vlmkit import read_model_config

    return read_model_config(folder)


def checkpoint_head_untied(cfg: ModelConfig) -> bool:
    """Whether the pretrained language checkpoint of ``cfg`` holds an output head of its own, which
    transformers then loads untied even for an architecture it builds tied from a config (T5 in
    transformers 5): a hub checkpoint whose config says ``tie_word_embeddings: false``, or a local
    folder whose weights hold ``lm_head.weight`` (``save_pretrained`` leaves a tied head out) or whose
    config says so.

    Raises:
        ConfigError: the source cannot be sized offline (see :func:`architecture_config`).
    """
    cfg = saved_model_config(cfg)
    source = cfg.language.pretrained
    if not source:
        return False
    source = _plain_source(source, "model.language.pretrained")
    fields, _ = architecture_config(source, "language")
    if fields.get("tie_word_embeddings") is False:
        return True
    return is_local(source) and "lm_head.weight" in checkpoint_tensor_names(Path(source))
