"""The processor: conversation + images -> ``input_ids``, ``labels``, ``pixel_values``; batching.

One ``<image>`` placeholder in the text becomes ``num_image_tokens`` copies of the image token id,
the count the connector emits per image, so the model can splice features in one-to-one.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmkit.processing.image import ImageTransform
from vlmkit.processing.templates import TEMPLATES, ChatTemplate, Message
from vlmkit.processing.tokenizer import IMAGE_TOKEN, load_tokenizer, prepare_tokenizer

IGNORE_INDEX = -100
PROCESSOR_FILE = "processor_config.json"


class EncodingError(ValueError):
    """A sample cannot be encoded (image count, length); the message says what and how to fix it."""


@dataclass
class Encoded:
    """One encoded sample. ``labels`` is ``None`` for generation prompts.

    Shapes: ``input_ids``/``labels`` ``(T,)``; ``pixel_values`` ``(num_images, 3, S, S)``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor | None
    pixel_values: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)


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
    """

    def __init__(
        self,
        tokenizer: Any,
        template: ChatTemplate,
        image_transform: ImageTransform,
        num_image_tokens: int,
        max_length: int = 2048,
        system_prompt: str | None = None,
    ):
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
    ) -> Encoded:
        """Encode a conversation and its images (in placeholder order).

        Images may be PIL images or tensors already transformed to ``(3, S, S)``.

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
        if len(out_ids) > self.max_length:
            raise EncodingError(
                f"the sample has {len(out_ids)} tokens ({len(images)} image(s) x {self.num_image_tokens} visual tokens "
                f"included), more than model.max_length={self.max_length}"
            )
        if not add_generation_prompt and all(l == IGNORE_INDEX for l in out_labels):
            raise EncodingError("the sample has no assistant tokens to train on")
        pixels = [img if isinstance(img, torch.Tensor) else self.image_transform(img) for img in images]
        size = self.image_transform.size
        pixel_values = torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size)
        return Encoded(
            input_ids=torch.tensor(out_ids, dtype=torch.long),
            labels=None if add_generation_prompt else torch.tensor(out_labels, dtype=torch.long),
            pixel_values=pixel_values,
        )

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
        length = max(s.input_ids.numel() for s in samples)
        batch = len(samples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        with_labels = all(s.labels is not None for s in samples)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long) if with_labels else None
        for i, s in enumerate(samples):
            n = s.input_ids.numel()
            sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[i, sl] = s.input_ids
            attention[i, sl] = 1
            if labels is not None:
                labels[i, sl] = s.labels
        out = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "pixel_values": torch.cat([s.pixel_values for s in samples]),
            "image_counts": torch.tensor([s.pixel_values.shape[0] for s in samples], dtype=torch.long),
        }
        if labels is not None:
            out["labels"] = labels
        return out

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of generated ids, special tokens and surrounding whitespace removed."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: the template's stop strings that are single tokens, plus EOS."""
        ids = []
        for s in (*self.template.stop_strings(self.tokenizer), self.tokenizer.eos_token):
            if s and s in self.tokenizer.get_vocab():
                ids.append(self.tokenizer.convert_tokens_to_ids(s))
        return list(dict.fromkeys(ids))

    # ----------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Write the tokenizer and ``processor_config.json`` into ``folder``."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        t = self.image_transform
        (folder / PROCESSOR_FILE).write_text(json.dumps({
            "template": self.template.name,
            "num_image_tokens": self.num_image_tokens,
            "max_length": self.max_length,
            "system_prompt": self.system_prompt,
            "image_size": t.size, "image_mean": list(t.mean), "image_std": list(t.std), "image_aspect": t.aspect,
        }, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "VLMProcessor":
        """Load a processor saved by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: ``folder`` has no ``processor_config.json``.
        """
        folder = Path(folder)
        path = folder / PROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; is {folder} a vlmkit model folder?")
        cfg = json.loads(path.read_text())
        transform = ImageTransform(cfg["image_size"], tuple(cfg["image_mean"]), tuple(cfg["image_std"]), cfg["image_aspect"])
        return cls(
            load_tokenizer(str(folder / "tokenizer")), TEMPLATES.get(cfg["template"]), transform,
            cfg["num_image_tokens"], cfg["max_length"], cfg.get("system_prompt"),
        )
