"""Encoder-decoder adapter (Flan-T5, as BLIP-2 FlanT5 / InstructBLIP).

The visual tokens enter the encoder together with the prompt; the decoder produces the answer. The
processor's ``encoder-decoder`` layout gives ``input_ids`` (the prompt, ending where the reply
starts) and ``labels`` ``(B, T_answer)``: the reply's tokens, ``-100``-padded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlmkit.models.language.base import IGNORE_INDEX, LanguageModel, LossOutput


class Seq2SeqLanguageModel(LanguageModel):
    """Adapter around an ``AutoModelForSeq2SeqLM``."""

    auto_class = "AutoModelForSeq2SeqLM"

    def loss(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Cross-entropy of the decoder summed over ``labels`` ``(B, T_answer)`` (teacher forcing: the
        decoder input is the labels shifted right behind the decoder start token)."""
        labels = batch["labels"]
        n = int((labels != IGNORE_INDEX).sum())
        out = self.hf_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
        if n == 0:
            return LossOutput(out.logits.sum() * 0.0, 0)
        total = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return LossOutput(total, n)

    def logits(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor | None = None, **kwargs: Any,
    ) -> torch.Tensor:
        """Decoder logits ``(B, T_dec, V)``; without ``decoder_input_ids`` the decoder sees only its
        start token, giving the distribution of the answer's first token ``(B, 1, V)``."""
        if decoder_input_ids is None:
            start = self.config.decoder_start_token_id
            decoder_input_ids = torch.full((inputs_embeds.shape[0], 1), int(start), dtype=torch.long, device=inputs_embeds.device)
        out = self.hf_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, use_cache=False
        )
        return out.logits

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Answer ids ``(B, T_new)``: transformers returns the decoder start token first; it is dropped."""
        out = self.hf_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return out[:, 1:]
