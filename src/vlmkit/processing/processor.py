"""The processor: conversation + images -> ``input_ids``, ``labels``, ``pixel_values``; batching.

One ``<image>`` placeholder in the text becomes ``num_image_tokens`` copies of the image token id,
the count the connector emits per image, so the model can splice features in one-to-one.

The layout follows the language model's kind:

* ``decoder``: ``input_ids`` and ``labels`` ``(T,)`` aligned; assistant tokens are labels.
* ``encoder-decoder``: the prompt (everything before the last assistant reply, earlier turns
  included) is ``input_ids``; the last reply's tokens are ``labels``.
* ``encoder``: no generation. If the last reply is in the answer vocabulary the sample is a VQA
  example (``input_ids`` = the prompt, ``labels`` = the answer's index); otherwise (e.g. a caption) it
  is an image-text pair for matching (``input_ids`` = the whole text, ``match_label`` = 1), and
  :meth:`VLMProcessor.collate` adds an in-batch negative for each such pair.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlmkit.processing.image import ImageTransform
from vlmkit.processing.templates import ChatTemplate, Message
from vlmkit.processing.tokenizer import IMAGE_TOKEN, prepare_tokenizer

IGNORE_INDEX = -100
LAYOUTS = ("decoder", "encoder-decoder", "encoder")


class EncodingError(ValueError):
    """A sample cannot be encoded (image count, length); the message says what and how to fix it."""


@dataclass
class Encoded:
    """One encoded sample. ``labels`` is ``None`` for generation prompts.

    Shapes: ``input_ids`` ``(T,)``; ``labels`` ``(T,)`` (decoder), ``(T_answer,)`` (encoder-decoder) or
    ``()`` (encoder: answer index, ``-100`` for a matching pair); ``pixel_values`` ``(num_images, 3, S, S)``.
    ``match_label``: 1 for an image-text matching pair (encoder layout), else ``None``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor | None
    pixel_values: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    match_label: int | None = None


class VLMProcessor:
    """Turns conversations with images into model inputs.

    Args:
        tokenizer: a fast tokenizer (``<image>`` is added if missing).
        template: renders conversations (see :mod:`vlmkit.processing.templates`).
        image_transform: image -> normalised ``(3, S, S)`` tensor.
        num_image_tokens: visual tokens per image (the connector's output count).
        max_length: longest encoded sample; longer ones raise :class:`EncodingError`.
        system_prompt: system message added when a conversation has none (``None``: template default,
            ``""``: no system message).
        layout: ``decoder``, ``encoder-decoder`` or ``encoder`` (the language model's kind; see module doc).
        answers: answer vocabulary (encoder layout).

    Raises:
        ValueError: an unknown layout, or the encoder layout without answers.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: ChatTemplate,
        image_transform: ImageTransform,
        num_image_tokens: int,
        max_length: int = 2048,
        system_prompt: str | None = None,
        layout: str = "decoder",
        answers: list[str] | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"processor layout {layout!r} is not valid; choose one of {', '.join(LAYOUTS)}")
        if layout == "encoder" and not answers:
            raise ValueError("the encoder layout (classification) needs the answer vocabulary (model.answers)")
        self.layout = layout
        self.answers = list(answers or [])
        self._answer_index = {a: i for i, a in enumerate(self.answers)}
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.template = template
        self.image_transform = image_transform
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = int(max_length)
        self.system_prompt = system_prompt
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_token_id = self.tokenizer.pad_token_id

    # ----------------------------------------------------------------------------------------
    def _with_system(self, messages: list[Message]) -> list[Message]:
        if self.system_prompt is None or (messages and messages[0].role == "system"):
            return messages
        return [Message("system", self.system_prompt), *messages]

    def tokenize(
        self, messages: list[Message], template: ChatTemplate | None = None, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids and a train mask for a conversation (placeholders not yet expanded).

        A token is trained on when its first character lies in a trained segment of the template.
        """
        template = template or self.template
        segments = template.segments(self._with_system(messages), self.tokenizer, add_generation_prompt)
        text = "".join(t for t, _ in segments)
        starts, ends, flags = [], [], []
        pos = 0
        for seg_text, train in segments:
            starts.append(pos)
            pos += len(seg_text)
            ends.append(pos)
            flags.append(train)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = []
        for start, end in enc["offset_mapping"]:
            i = bisect.bisect_right(starts, start) - 1
            mask.append(bool(flags[i]) if i >= 0 and start < ends[i] else False)
        return list(enc["input_ids"]), mask

    def encode(
        self,
        messages: list[Message],
        images: list[Image.Image | torch.Tensor],
        template: ChatTemplate | None = None,
        add_generation_prompt: bool = False,
        as_pair: bool = False,
    ) -> Encoded:
        """Encode a conversation and its images (in placeholder order).

        Images may be PIL images or tensors already transformed to ``(3, S, S)``. ``as_pair``: the
        whole conversation is input and there are no labels (image-text matching at inference).

        Raises:
            EncodingError: the number of ``<image>`` placeholders differs from ``len(images)``, or the
                encoded sample is longer than ``max_length``.
            TemplateError: the conversation's roles are out of order or it is empty.
        """
        ids, mask = self.tokenize(messages, template, add_generation_prompt)
        n_placeholders = sum(1 for t in ids if t == self.image_token_id)
        if n_placeholders != len(images):
            raise EncodingError(
                f"the conversation has {n_placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s); "
                "each image needs exactly one placeholder"
            )
        out_ids: list[int] = []
        out_labels: list[int] = []
        for tok, train in zip(ids, mask):
            if tok == self.image_token_id:
                out_ids.extend([self.image_token_id] * self.num_image_tokens)
                out_labels.extend([IGNORE_INDEX] * self.num_image_tokens)
            else:
                out_ids.append(tok)
                out_labels.append(tok if train else IGNORE_INDEX)
        match_label = None
        if as_pair:
            labels_out: list[int] | int | None = None
        elif add_generation_prompt or self.layout == "decoder":
            labels_out = None if add_generation_prompt else out_labels
        else:
            out_ids, labels_out, match_label = self._split_reply(out_ids, out_labels, messages[-1].content)
        if len(out_ids) > self.max_length:
            raise EncodingError(
                f"the sample has {len(out_ids)} tokens ({len(images)} image(s) x {self.num_image_tokens} visual tokens "
                f"included), more than model.max_length={self.max_length}"
            )
        if not (add_generation_prompt or as_pair) and all(l == IGNORE_INDEX for l in out_labels):
            raise EncodingError("the sample has no assistant tokens to train on")
        if isinstance(labels_out, list) and not labels_out:
            raise EncodingError("the sample's last assistant reply has no tokens to train on")
        pixels = [img if isinstance(img, torch.Tensor) else self.image_transform(img) for img in images]
        size = self.image_transform.size
        pixel_values = torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size)
        return Encoded(
            input_ids=torch.tensor(out_ids, dtype=torch.long),
            labels=None if labels_out is None else torch.tensor(labels_out, dtype=torch.long),
            pixel_values=pixel_values,
            match_label=match_label,
        )

    def _split_reply(self, ids: list[int], labels: list[int], reply: str) -> tuple[list[int], list[int] | int, int | None]:
        """Split an encoded training conversation at its last assistant reply (see module doc).

        Returns ``(input_ids, labels, match_label)`` for the encoder-decoder or encoder layout.
        """
        end = max((i for i, l in enumerate(labels) if l != IGNORE_INDEX), default=-1)
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        if self.layout == "encoder-decoder":
            return ids[:start], [l for l in labels[start : end + 1] if l != IGNORE_INDEX], None
        index = self.answer_index(reply)
        if index is None:
            return ids, IGNORE_INDEX, 1
        return ids[:start], index, None

    def answer_index(self, answer: str) -> int | None:
        """Index of ``answer`` (stripped) in the answer vocabulary, ``None`` when absent."""
        return self._answer_index.get(answer.strip())

    def prompt(self, text: str, images: list[Image.Image | torch.Tensor], history: list[Message] | None = None) -> Encoded:
        """Encode a user turn (after ``history``) for generation.

        ``images`` are all images of the conversation in order; ``text`` gets a leading ``<image>\\n``
        for each image that no placeholder in ``history`` or ``text`` accounts for.
        """
        placed = text.count(IMAGE_TOKEN) + sum(m.content.count(IMAGE_TOKEN) for m in history or [])
        missing = len(images) - placed
        if missing > 0:
            text = (IMAGE_TOKEN + "\n") * missing + text
        messages = [*(history or []), Message("user", text)]
        return self.encode(messages, images, add_generation_prompt=True)

    # ----------------------------------------------------------------------------------------
    def collate(self, samples: list[Encoded], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad a list of samples into a batch.

        Returns:
            ``input_ids`` ``(B, T)``, ``attention_mask`` ``(B, T)``, ``labels`` ``(B, T)`` (when every
            sample has labels), ``pixel_values`` ``(sum(images), 3, S, S)`` in sample order and
            ``image_counts`` ``(B,)`` so the model can check each row's placeholders against its images.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; choose 'left' or 'right'")
        if self.layout == "encoder" and any(s.match_label is not None for s in samples):
            samples = samples + self._matching_negatives(samples)
        length = max(s.input_ids.numel() for s in samples)
        batch = len(samples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        with_labels = all(s.labels is not None for s in samples)
        aligned = with_labels and self.layout == "decoder"
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long) if aligned else None
        for i, s in enumerate(samples):
            n = s.input_ids.numel()
            sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[i, sl] = s.input_ids
            attention[i, sl] = 1
            if labels is not None:
                labels[i, sl] = s.labels
        if with_labels and self.layout == "encoder-decoder":
            longest = max(s.labels.numel() for s in samples)
            labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
            for i, s in enumerate(samples):
                labels[i, : s.labels.numel()] = s.labels
        elif with_labels and self.layout == "encoder":
            labels = torch.stack([s.labels for s in samples])
        out = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "pixel_values": torch.cat([s.pixel_values for s in samples]),
            "image_counts": torch.tensor([s.pixel_values.shape[0] for s in samples], dtype=torch.long),
        }
        if labels is not None:
            out["labels"] = labels
        if self.layout == "encoder" and with_labels:
            out["match_labels"] = torch.tensor(
                [IGNORE_INDEX if s.match_label is None else s.match_label for s in samples], dtype=torch.long
            )
        return out

    @staticmethod
    def _matching_negatives(samples: list[Encoded]) -> list[Encoded]:
        """One in-batch negative per image-text pair: its image with the next pair's text.

        Deterministic (the next pair in batch order); the label is 1 only when the two texts are
        identical token for token. Pairs whose image counts differ are not combined.
        """
        pairs = [s for s in samples if s.match_label is not None]
        negatives = []
        for k, own in enumerate(pairs):
            other = pairs[(k + 1) % len(pairs)]
            if other is own or other.pixel_values.shape[0] != own.pixel_values.shape[0]:
                continue
            same = torch.equal(other.input_ids, own.input_ids)
            negatives.append(Encoded(other.input_ids, torch.tensor(IGNORE_INDEX), own.pixel_values, match_label=int(same)))
        return negatives

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of generated ids, special tokens and surrounding whitespace removed."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _stops(self) -> tuple[tuple[str, ...], list[int]]:
        """(stop strings, stop ids), computed once per vocabulary size: a tokenizer's ``get_vocab()``
        builds a dict of the whole vocabulary (~30 ms for 49k tokens), too slow for every answer."""
        key = (len(self.tokenizer), self.template.name, self.tokenizer.eos_token)
        cached = getattr(self, "_stop_cache", None)
        if cached is None or cached[0] != key:
            vocab = self.tokenizer.get_vocab()
            strings = self.template.stop_strings(self.tokenizer)
            ids = [vocab[s] for s in (*strings, self.tokenizer.eos_token) if s and s in vocab]
            cached = (key, strings, list(dict.fromkeys(ids)))
            self._stop_cache = cached
        return cached[1], list(cached[2])

    def stop_strings(self) -> tuple[str, ...]:
        """The template's stop strings for this tokenizer (EOS and end-of-turn markers it has)."""
        return self._stops()[0]

    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: the template's stop strings that are single tokens, plus EOS."""
        return self._stops()[1]
