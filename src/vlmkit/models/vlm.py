"""VisionLanguageModel: vision encoder -> connector -> visual tokens spliced into a causal LM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.models.connectors.base import Connector
from vlmkit.models.language.base import CausalLanguageModel
from vlmkit.models.vision.base import VisionEncoder

IGNORE_INDEX = -100


class ImageTokenMismatchError(ValueError):
    """The image placeholders in a row do not match the images given for it."""


@dataclass
class VLMOutput:
    """``loss`` (scalar, mean over label tokens) when labels were given; ``logits`` ``(B, T, V)`` otherwise.

    ``num_label_tokens`` counts the tokens the loss averages over.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_label_tokens: int = 0


class VisionLanguageModel(nn.Module):
    """LLaVA-style prefix fusion: each image's visual tokens replace its placeholder tokens.

    Args:
        vision: returns ``(num_images, N, D_vision)``.
        connector: maps them to ``(num_images, M, D_language)``.
        language: the causal language model adapter.
        image_token_id: id of the ``<image>`` placeholder; the processor repeats it ``M`` times per image.

    The three parts are addressed by name (``vision``, ``connector``, ``language``) for
    trainability policies and checkpoints.
    """

    part_names = ("vision", "connector", "language")

    def __init__(self, vision: VisionEncoder, connector: Connector, language: CausalLanguageModel, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.language = language
        self.image_token_id = int(image_token_id)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image in the language model's sequence."""
        return self.connector.num_output_tokens

    def parts(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.part_names}

    # ----------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(num_images, 3, S, S) -> (num_images, M, D_language)``."""
        return self.connector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_counts: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with visual features spliced in at the placeholders.

        Args:
            input_ids: ``(B, T)``.
            pixel_values: ``(sum(image_counts), 3, S, S)``, images in row order.
            image_counts: ``(B,)`` images per row; ``None`` means all images belong, in order, to the
                rows' placeholders (only checked in total).

        Returns:
            ``(B, T, H)``.

        Raises:
            ImageTokenMismatchError: a row's placeholder count is not ``images x M`` (the message names
                the row and both counts), so images and tokens can never be silently misaligned.
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
        embeds = self.language.embed(input_ids.masked_fill(is_image, 0))
        if n_images:
            feats = self.encode_images(pixel_values).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> VLMOutput:
        """Loss (with ``labels`` ``(B, T)``, ``-100`` = ignore) or full logits ``(B, T, V)``.

        With labels and a backbone whose logits are a plain head projection, the LM head runs only on
        the positions that predict a label, the main saving over computing ``(B, T, V)`` logits.
        """
        embeds = self.embed(input_ids, pixel_values, image_counts)
        if labels is None:
            return VLMOutput(logits=self.language.logits(embeds, attention_mask))
        targets = labels[:, 1:]
        select = targets != IGNORE_INDEX
        n = int(select.sum())
        if self.language.spec.plain_head:
            hidden = self.language.hidden_states(embeds, attention_mask)
            logits = self.language.head(hidden[:, :-1][select])
        else:
            logits = self.language.logits(embeds, attention_mask)[:, :-1][select]
        if n == 0:
            return VLMOutput(loss=logits.sum() * 0.0, num_label_tokens=0)
        loss = F.cross_entropy(logits.float(), targets[select])
        return VLMOutput(loss=loss, num_label_tokens=n)

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
        (KV cache, greedy or sampling, stop tokens)."""
        embeds = self.embed(input_ids, pixel_values, image_counts)
        return self.language.generate(embeds, attention_mask, **generate_kwargs)
