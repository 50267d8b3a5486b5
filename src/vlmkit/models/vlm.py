"""VisionLanguageModel: vision encoder -> connector -> fusion -> language backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmkit.models.connectors.base import Connector
from vlmkit.models.fusion import Fusion, PrefixFusion
from vlmkit.models.language.base import IGNORE_INDEX, LanguageModel  # noqa: F401  (IGNORE_INDEX re-exported)
from vlmkit.models.vision.base import VisionEncoder


#: batch keys that hold training targets (``-100`` = no target)
TARGET_KEYS = ("labels", "match_labels")


class ImageTokenMismatchError(ValueError):
    """The image placeholders in a row do not match the images given for it."""


@dataclass
class VLMOutput:
    """``loss`` (scalar, mean over targets) and ``loss_sum`` (their sum) when targets were given;
    ``logits`` otherwise (shape per language kind: ``(B, T, V)`` decoder-only, ``(B, T_dec, V)``
    encoder-decoder, ``(B, answers)`` encoder-only).

    ``num_label_tokens`` counts the targets (tokens, or rows for classification) the loss averages over.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_label_tokens: int = 0
    loss_sum: torch.Tensor | None = None


class VisionLanguageModel(nn.Module):
    """Vision encoder -> connector -> fusion -> language model.

    Args:
        vision: returns ``(num_images, N, D_vision)``.
        connector: maps them to ``(num_images, M, D_language)``.
        language: the language model adapter (decoder-only, encoder-decoder or encoder-only).
        image_token_id: id of the ``<image>`` placeholder; the processor repeats it
            ``fusion.tokens_per_image(M)`` times per image (``M`` for prefix fusion, 1 for cross-attention).
        fusion: how visual tokens reach the language model (default: LLaVA-style prefix tokens).

    The parts are addressed by name (``vision``, ``connector``, ``fusion``, ``language``) for
    trainability policies and checkpoints.
    """

    part_names = ("vision", "connector", "fusion", "language")

    def __init__(
        self, vision: VisionEncoder, connector: Connector, language: LanguageModel, image_token_id: int, fusion: Fusion | None = None
    ):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.fusion = fusion if fusion is not None else PrefixFusion()
        self.language = language
        self.image_token_id = int(image_token_id)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image in the language model's sequence."""
        return self.fusion.tokens_per_image(self.connector.num_output_tokens)

    def parts(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.part_names}

    # ----------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(num_images, 3, S, S) -> (num_images, M, D_language)``."""
        return self.connector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_counts: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings ``(B, T, H)`` with the images spliced in (prefix fusion); for
        cross-attention fusion the token embeddings alone (its context is in :meth:`prepare`)."""
        return self.prepare(input_ids, pixel_values, image_counts)[0]

    def prepare(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_counts: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Token embeddings with the images fused in, and the keyword arguments the language model's
        forward needs besides them (the cross-attention context; empty for prefix fusion).

        Args:
            input_ids: ``(B, T)``.
            pixel_values: ``(sum(image_counts), 3, S, S)``, images in row order.
            image_counts: ``(B,)`` images per row; ``None`` means all images belong, in order, to the
                rows' placeholders (only checked in total).

        Returns:
            ``(B, T, H)`` embeddings and a dict of extra forward arguments.

        Raises:
            ImageTokenMismatchError: a row's placeholder count is not ``images x tokens per image`` (the
                message names the row and both counts), so images and tokens can never be silently misaligned.
        """
        is_image = input_ids == self.image_token_id
        per_row = is_image.sum(dim=1)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        m = self.num_image_tokens
        if image_counts is not None:
            if image_counts.numel() != input_ids.shape[0] or int(image_counts.sum()) != n_images:
                raise ImageTokenMismatchError(
                    f"image_counts {image_counts.tolist()} do not describe {n_images} images for {input_ids.shape[0]} rows"
                )
            bad = (per_row != image_counts.to(per_row.device) * m).nonzero().flatten().tolist()
            if bad:
                row = bad[0]
                raise ImageTokenMismatchError(
                    f"row {row} has {int(per_row[row])} image tokens but {int(image_counts[row])} image(s) x {m} "
                    f"visual tokens = {int(image_counts[row]) * m} were expected"
                )
        elif int(per_row.sum()) != n_images * m:
            raise ImageTokenMismatchError(
                f"the batch has {int(per_row.sum())} image tokens but {n_images} image(s) x {m} visual tokens "
                f"= {n_images * m} were expected"
            )
        else:
            image_counts = per_row // m
        features = self.encode_images(pixel_values) if n_images else None
        return self.fusion.embed(self.language, input_ids, is_image, features, image_counts.to(input_ids.device))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        match_labels: torch.Tensor | None = None,
        **_: Any,
    ) -> VLMOutput:
        """Loss when targets are given, else logits.

        Targets: ``labels`` (``(B, T)`` aligned with the inputs for decoder-only, ``(B, T_answer)``
        for encoder-decoder, ``(B,)`` answer indices for encoder-only; ``-100`` = ignore) and, for
        encoder-only, ``match_labels`` ``(B,)`` (image-text matching).
        """
        embeds, extra = self.prepare(input_ids, pixel_values, image_counts)
        if labels is None and match_labels is None:
            return VLMOutput(logits=self.language.logits(embeds, attention_mask, **extra))
        targets = {k: v for k, v in (("labels", labels), ("match_labels", match_labels)) if v is not None}
        out = self.language.loss(embeds, attention_mask, targets, **extra)
        return VLMOutput(loss=out.loss, num_label_tokens=out.count, loss_sum=out.total)

    def count_targets(self, batch: dict[str, Any]) -> int:
        """How many targets the loss of ``batch`` sums over (no forward pass)."""
        targets = {k: batch[k] for k in TARGET_KEYS if batch.get(k) is not None}
        return self.language.count_targets(targets) if targets else 0

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids ``(B, T_new)`` for left-padded prompts, through transformers' ``generate``
        (KV cache, greedy or sampling, stop tokens).

        Raises:
            NotGenerativeError: the language model is encoder-only (see :meth:`classify`).
        """
        embeds, extra = self.prepare(input_ids, pixel_values, image_counts)
        return self.language.generate(embeds, attention_mask, **extra, **generate_kwargs)

    @torch.no_grad()
    def classify(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Answer logits ``(B, num_answers)`` of an encoder-only model (VQA as classification).

        Raises:
            ValueError: the language model is not encoder-only.
        """
        self._require_encoder("classify")
        return self.language.logits(self.embed(input_ids, pixel_values, image_counts), attention_mask)

    @torch.no_grad()
    def match_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Probability ``(B,)`` that each row's text describes its image (encoder-only ITM head)."""
        self._require_encoder("match_scores")
        logits = self.language.match_logits(self.embed(input_ids, pixel_values, image_counts), attention_mask)
        return logits.float().softmax(-1)[:, 1]

    def _require_encoder(self, what: str) -> None:
        if self.language.spec.kind != "encoder":
            raise ValueError(
                f"{what} needs an encoder-only language backbone; {self.language.spec.name!r} is {self.language.spec.kind} (use generate)"
            )
