"""The training loss of each language-model kind on fake tensors: one registry entry per kind.

The trace (:mod:`.trace`) runs the vision tower, the connector and the fusion, then hands the fused
embeddings to the entry of the language model's kind (``BackboneSpec.kind``). Each entry computes what
that kind's adapter computes in training (:mod:`vlmkit.models.language`), with the same modules and
in the same order, but without the steps fake tensors cannot run because they read data (counting
the targets, selecting the labelled positions with a mask): the planner gives those by number.

* ``decoder`` (:class:`~vlmkit.models.language.CausalLanguageModel`): the final hidden states, the LM
  head on the labelled positions only (plain-head families) or on every position, float32
  cross-entropy. Targets: ``labelled`` positions of the micro-batch.
* ``encoder-decoder`` (:class:`~vlmkit.models.language.Seq2SeqLanguageModel`): the prompt (visual
  tokens included) through the encoder, the answer through the decoder with teacher forcing, the
  model's own loss and the adapter's float32 cross-entropy over ``(B, T_answer, V)`` logits. Targets:
  ``labels`` ``(B, answer_len)``.
* ``encoder`` (:class:`~vlmkit.models.language.EncoderLanguageModel`): the first token's hidden state,
  the VQA classifier over the answer vocabulary and the image-text-matching head (on no rows, as for
  a batch of VQA rows). Targets: one answer index per row ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vlmkit.registry import Registry

IGNORE_INDEX = -100


@dataclass(frozen=True)
class KindLoss:
    """How one language-model kind's loss is traced.

    Attributes:
        targets: ``(batch) -> tensor``: the fake targets of a :class:`~vlmkit.planning.trace.MicroBatch`
            (made inside the fake mode).
        loss: ``(language, embeds, extra, targets) -> scalar``: the summed training loss of the fused
            embeddings ``(B, T, H)`` (``extra``: the fusion's keyword arguments for the forward).
        labelled: ``(rows, text, answer_len, label_fraction) -> int``: the targets of a micro-batch of
            ``rows`` samples with ``text`` text positions each (after the visual tokens).
        target_elements: ``(rows, seq_len, answer_len) -> int``: int64 elements of the collated batch's
            target tensors (``labels``, ``match_labels``), for the batch's bytes on the device.
        note: what the plan assumes for this kind (printed with the plan; ``{answer_len}`` is filled
            in), or empty.
    """

    targets: Callable[[Any], torch.Tensor]
    loss: Callable[[Any, torch.Tensor, dict[str, Any], torch.Tensor], torch.Tensor]
    labelled: Callable[[int, int, int, float], int]
    target_elements: Callable[[int, int, int], int]
    note: str = ""


KIND_LOSSES: Registry[KindLoss] = Registry("language model kind")


def _decoder_loss(language, embeds, extra, positions):
    # CausalLanguageModel.loss with the labelled positions given as `positions` (rows and columns alike;
    # only their number matters)
    if language.spec.plain_head:
        hidden = language.hidden_states(embeds, None, **extra)
        logits = language.head(hidden[:, :-1][positions, positions])
    else:
        logits = language.logits(embeds, None, **extra)[:, :-1][positions, positions]
    return F.cross_entropy(logits.float(), positions, reduction="sum")


def _seq2seq_loss(language, embeds, extra, labels):
    # Seq2SeqLanguageModel.loss: transformers computes its own loss from `labels` as well; the adapter
    # sums a float32 cross-entropy over the decoder's logits. The attention mask is there as in a collated
    # batch: with it T5 widens its position bias to every row (B, heads, T, T), which attention keeps
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    out = language.hf_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
    return F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _encoder_loss(language, embeds, extra, labels):
    # EncoderLanguageModel.loss on a batch of VQA rows: both heads stay in the graph
    pooled = language.pooled(embeds, None)
    total = pooled.sum() * 0.0
    total = total + F.cross_entropy(language.vqa_head(pooled).float(), labels, reduction="sum")
    return total + language.itm_head(pooled[:0]).sum() * 0.0


KIND_LOSSES.register("decoder", KindLoss(
    targets=lambda batch: torch.zeros(batch.labelled, dtype=torch.long),
    loss=_decoder_loss,
    # every text position but the last predicts a label at most; --label-fraction of them do
    labelled=lambda rows, text, answer_len, fraction: rows * max(1, round((text - 1) * fraction)),
    target_elements=lambda rows, seq_len, answer_len: rows * seq_len,  # labels aligned with input_ids
))
KIND_LOSSES.register("encoder-decoder", KindLoss(
    targets=lambda batch: torch.zeros(batch.rows, batch.answer_len, dtype=torch.long),
    loss=_seq2seq_loss,
    labelled=lambda rows, text, answer_len, fraction: rows * answer_len,  # the decoder's logits cover every answer position
    target_elements=lambda rows, seq_len, answer_len: rows * answer_len,
    note="encoder-decoder: the sequence is the encoder's input (visual tokens and prompt); the decoder writes "
         "answers of {answer_len} tokens (--answer-len; the processor does not cap answers, pass your data's longest)",
))
KIND_LOSSES.register("encoder", KindLoss(
    targets=lambda batch: torch.zeros(batch.rows, dtype=torch.long),
    loss=_encoder_loss,
    labelled=lambda rows, text, answer_len, fraction: rows,
    target_elements=lambda rows, seq_len, answer_len: 2 * rows,  # labels and match_labels, one per row
    note="encoder-only: rows are planned as VQA rows (one answer index each); an image-text pair (a caption) "
         "gets an in-batch negative in collate, so a stage of captions runs up to twice the rows per micro-batch",
))
