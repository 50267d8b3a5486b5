"""Building without weights (what a run's processes other than rank 0 do under ``train.rank0_loading``)
and giving weights back to copies: the architecture built from a checkpoint's config alone must be the
one ``from_pretrained`` builds, parameter for parameter, ties included."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import TINY_LM, TINY_VISION, seeded
from vlmkit.models.hf_config import without_weights
from vlmkit.models.language.families import build_language_model
from vlmkit.models.vision.towers import build_vision_encoder
from vlmkit.training.materialize import allocate, first_difference, has_meta, retie, structure, tie_groups
from vlmkit.training.strategies import meta_copy

ANSWERS = ["yes", "no"]


def _language(family: str, folder, vocab: int):
    return build_language_model(family, str(folder) if folder else None, {} if folder else dict(TINY_LM[family]),
                                vocab_size=vocab, answers=ANSWERS)


def _tower(family: str, folder):
    return build_vision_encoder(family, str(folder) if folder else None, {} if folder else dict(TINY_VISION[family]),
                                -2, False, None, None, None)


def test_every_family_builds_from_its_config_alone_as_from_pretrained_builds_it(tmp_path):
    """Each language family (with and without a resized vocabulary) and each tower family: the same
    names, shapes, dtypes and ties as the real load, all on the meta device, from a folder that holds
    only config.json (no weight is read)."""
    for family in TINY_LM:
        seeded(0)
        _language(family, None, 300).hf_model.save_pretrained(tmp_path / family)
        config_only = tmp_path / f"{family}-config-only"
        config_only.mkdir()
        shutil.copy(tmp_path / family / "config.json", config_only)
        for vocab in (300, 320):  # 320: more tokens than the checkpoint's rows, resized on load
            real = _language(family, tmp_path / family, vocab)
            with without_weights():
                skeleton = _language(family, config_only, vocab)
            assert structure(skeleton) == structure(real), f"{family}, vocabulary {vocab}: {first_difference(structure(skeleton), structure(real))}"
            assert all(p.is_meta for p in skeleton.parameters()), family
        with pytest.raises(FileNotFoundError, match="has no safetensors weights"):
            _language(family, config_only, 300)
    for family in TINY_VISION:
        seeded(0)
        _tower(family, None).tower.save_pretrained(tmp_path / f"v-{family}")
        (tmp_path / f"v-{family}" / "model.safetensors").rename(tmp_path / f"v-{family}.safetensors")
        with without_weights():
            skeleton = _tower(family, tmp_path / f"v-{family}")
        (tmp_path / f"v-{family}.safetensors").rename(tmp_path / f"v-{family}" / "model.safetensors")
        real = _tower(family, tmp_path / f"v-{family}")
        assert structure(skeleton) == structure(real), f"{family}: {first_difference(structure(skeleton), structure(real))}"
        assert has_meta(skeleton) and not has_meta(real)


def test_a_checkpoint_with_its_own_output_head_builds_untied(tmp_path):
    """Flan-T5 checkpoints hold ``lm_head.weight`` besides the shared embeddings; transformers 5 builds
    T5 tied from any config but loads such a checkpoint untied. The weightless build reads the tensor
    names (not the tensors) and unties as the load does."""
    seeded(0)
    hf = _language("flan_t5", None, 300).hf_model
    hf.lm_head.weight = torch.nn.Parameter(hf.shared.weight.detach() + 1)
    hf.save_pretrained(tmp_path / "t5")
    real = _language("flan_t5", tmp_path / "t5", 300)
    with without_weights():
        skeleton = _language("flan_t5", tmp_path / "t5", 300)
    assert real.hf_model.lm_head.weight is not real.hf_model.shared.weight
    assert skeleton.hf_model.lm_head.weight is not skeleton.hf_model.shared.weight
    assert structure(skeleton) == structure(real)


def test_copies_get_back_exactly_the_ties_the_model_had(build_tiny):
    """FSDP and DeepSpeed hand back a copy filled with ``assign=True``, and a process that built without
    weights allocates with ``to_empty``; both separate tied tensors. They are tied again as the model
    had them, not as its config says: an output head of its own stays its own although the config ties."""
    model, _ = build_tiny(connector="linear")
    lm = model.language.hf_model
    lm.config.tie_word_embeddings = True
    lm.tie_weights()
    own_head = torch.nn.Parameter(lm.get_input_embeddings().weight.detach() + 1)
    lm.get_output_embeddings().weight = own_head
    untied = meta_copy(model)
    untied.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    retie(untied, tie_groups(model))
    assert untied.language.hf_model.get_output_embeddings().weight is not untied.language.hf_model.get_input_embeddings().weight
    torch.testing.assert_close(untied.language.hf_model.get_output_embeddings().weight, own_head, rtol=0, atol=0)

    lm.tie_weights()
    groups = tie_groups(model)
    assert groups == [["language.model.model.embed_tokens.weight", "language.model.lm_head.weight"]]
    skeleton = meta_copy(model)
    allocate(skeleton)
    assert not has_meta(skeleton) and tie_groups(skeleton) == groups
    assert structure(skeleton) == structure(model)


def test_first_difference_names_the_entry():
    a = [("parameter", "w", (2, 3), "torch.float32", "w")]
    b = [("parameter", "w", (2, 4), "torch.float32", "w")]
    assert first_difference(a, b) == ("this process has ('parameter', 'w', (2, 3), 'torch.float32', 'w'), "
                                      "rank 0 has ('parameter', 'w', (2, 4), 'torch.float32', 'w')")
    assert first_difference(a, a + b) == "this process has nothing, rank 0 has ('parameter', 'w', (2, 4), 'torch.float32', 'w')"
