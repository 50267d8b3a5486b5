"""Encoder-only adapter (RoBERTa): discriminative, not generative.

Visual tokens and text go through the bidirectional encoder together; the hidden state of the first
attended token summarises the pair (as ViLT and BLIP's ITM head do). Two heads:

* VQA as classification over an answer vocabulary built from the training data
  (``labels`` ``(B,)``: answer index, ``-100`` for rows that are not VQA examples);
* image-text matching (``match_labels`` ``(B,)``: 1 = the text describes the image, 0 = it does not,
  ``-100`` for rows that are not ITM pairs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.models.language.base import (
    IGNORE_INDEX, BackboneSpec, LanguageModel, LossOutput, NotGenerativeError, padded_positions,
)


class EncoderLanguageModel(LanguageModel):
    """Adapter around an ``AutoModel`` encoder with a VQA classifier and an ITM head.

    Args:
        model: e.g. a ``RobertaModel`` (no pooler; the first attended token is pooled here).
        spec: its family.
        answers: the answer vocabulary; the classifier has one output per answer.
    """

    auto_class = "AutoModel"
    model_kwargs = {"add_pooling_layer": False}

    def __init__(self, model: nn.Module, spec: BackboneSpec, answers: list[str]):
        super().__init__(model, spec)
        if not answers:
            raise ValueError(
                f"the {spec.name!r} backbone is encoder-only: VQA is classification and needs model.answers "
                "(the answer vocabulary; `vlmkit train` builds it from the training data)"
            )
        self.answers = list(answers)
        h = self.hidden_size
        self.vqa_head = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.LayerNorm(2 * h), nn.Linear(2 * h, len(self.answers)))
        self.itm_head = nn.Linear(h, 2)
        self.to(self.dtype)

    # -- heads are weights outside the transformers model --------------------------------------
    _HEADS = ("vqa_head", "itm_head")

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in self._HEADS}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.split(".", 1)[0] in self._HEADS]
        if missing or unexpected:
            raise ValueError(f"saved task heads do not fit this model: missing {missing}, unexpected {unexpected}")

    def extra_parameters(self) -> list[nn.Parameter]:
        return [*self.vqa_head.parameters(), *self.itm_head.parameters()]

    # -- forward ---------------------------------------------------------------------------------
    def position_ids(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Positions ``(B, T)`` counting attended tokens only, so a left-padded row gets the positions
        it has alone; ``None`` (the model's own numbering) when no row starts with padding. RoBERTa's
        embeddings number tokens from ``padding_idx + 1`` and give pads ``padding_idx``, as its own
        ``create_position_ids_from_input_ids`` does; encoders without ``padding_idx`` count from 0."""
        positions = padded_positions(attention_mask)
        if positions is None:
            return None
        offset = getattr(getattr(self.hf_model, "embeddings", None), "padding_idx", None)
        if offset is None:
            return positions
        return (positions + offset + 1).masked_fill(attention_mask == 0, offset)

    def pooled(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Hidden state ``(B, H)`` of each row's first attended token (left or right padding give the
        same result: positions come from :meth:`position_ids`)."""
        out = self.hf_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            position_ids=self.position_ids(attention_mask))
        hidden = out.last_hidden_state
        if attention_mask is None:
            return hidden[:, 0]
        first = attention_mask.long().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]

    def logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """VQA answer logits ``(B, num_answers)``."""
        return self.vqa_head(self.pooled(inputs_embeds, attention_mask))

    def match_logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Image-text matching logits ``(B, 2)`` (index 1 = match)."""
        return self.itm_head(self.pooled(inputs_embeds, attention_mask))

    def loss(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Answer cross-entropy over VQA rows plus ITM cross-entropy over ITM rows, summed (each row
        one target). Both heads are always in the graph (with no rows: a zero term), so every process
        of a distributed run reduces gradients for the same parameters."""
        pooled = self.pooled(inputs_embeds, attention_mask)
        total = pooled.sum() * 0.0
        count = 0
        for head, key in ((self.vqa_head, "labels"), (self.itm_head, "match_labels")):
            targets = batch.get(key)
            rows = targets != IGNORE_INDEX if targets is not None else torch.zeros(pooled.shape[0], dtype=torch.bool, device=pooled.device)
            if rows.any():
                total = total + F.cross_entropy(head(pooled[rows]).float(), targets[rows], reduction="sum")
                count += int(rows.sum())
            else:
                total = total + head(pooled[:0]).sum() * 0.0
        return LossOutput(total, count)

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        raise self.not_generative()

    def not_generative(self) -> NotGenerativeError:
        """The error for asking this backbone to write text (it says what to use instead)."""
        return NotGenerativeError(
            f"the {self.spec.name!r} backbone is encoder-only and cannot generate text; it answers by classification "
            f"over its {len(self.answers)} training answers (VLMPipeline.classify, or `vlmkit eval`, which uses it) "
            "and scores image-text matches (VLMPipeline.match_scores)"
        )
