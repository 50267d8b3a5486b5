"""The inference API: ``vlmkit.load(path)`` returns a :class:`VLMPipeline`; ``pipeline.chat(image, prompt)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.processing.image import load_image
from vlmkit.processing.processor import VLMProcessor
from vlmkit.processing.templates import TEMPLATES, Message

ImageLike = Image.Image | str | Path


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. Greedy unless ``do_sample``; the KV cache is on unless ``use_cache=False``."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    use_cache: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def as_image(image: ImageLike) -> Image.Image:
    """A PIL image from a PIL image or a file path (EXIF-rotated, RGB)."""
    return image if isinstance(image, Image.Image) else load_image(image)


class VLMPipeline:
    """A model and its processor, ready to answer questions about images.

    Args:
        model: the vision-language model (put in eval mode).
        processor: its processor.
        device: where to run; defaults to the model's device.
    """

    def __init__(self, model: VisionLanguageModel, processor: VLMProcessor, device: str | torch.device | None = None):
        self.model = model.eval()
        self.processor = processor
        if device is not None:
            self.model.to(device)
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | None = None, dtype: str | None = None, allow_pickle: bool = False
    ) -> "VLMPipeline":
        """Load a model folder in any format vlmkit reads (see :mod:`vlmkit.formats`; detected from its files).

        Args:
            allow_pickle: read pickled weights (original LLaVA ``.bin``) with ``torch.load(weights_only=True)``.
        """
        from vlmkit.formats import load_model

        model, processor = load_model(folder, dtype=dtype, allow_pickle=allow_pickle)
        return cls(model, processor, device)

    def _generate_kwargs(self, settings: GenerationSettings) -> dict[str, Any]:
        tok = self.processor.tokenizer
        stop_ids = self.processor.stop_token_ids()
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "use_cache": settings.use_cache,
            "eos_token_id": stop_ids or None,
            "pad_token_id": self.processor.pad_token_id,
        }
        multi = [s for s in self.processor.template.stop_strings(tok) if s not in tok.get_vocab()]
        if multi:
            kwargs["stop_strings"] = multi
            kwargs["tokenizer"] = tok
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _prompt_batch(
        self, prompts: list[str], images: list[list[ImageLike]], histories: list[list[Message]] | None
    ) -> dict[str, torch.Tensor]:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        encoded = [
            self.processor.prompt(p, [as_image(i) for i in imgs], (histories or [None] * len(prompts))[k])
            for k, (p, imgs) in enumerate(zip(prompts, images))
        ]
        return self._collate(encoded, padding_side="left")

    def _collate(self, encoded: list, padding_side: str = "right") -> dict[str, torch.Tensor]:
        """The processor's batch of ``encoded`` samples, on the model's device."""
        return {k: v.to(self.device) for k, v in self.processor.collate(encoded, padding_side=padding_side).items()}

    def generate(
        self,
        prompts: list[str],
        images: list[list[ImageLike]],
        settings: GenerationSettings | None = None,
        histories: list[list[Message]] | None = None,
    ) -> list[str]:
        """Answer a batch of prompts (each with its images) in one left-padded generate call.

        Raises:
            EncodingError: a prompt's placeholders do not match its images.
            NotGenerativeError: the model's language backbone is encoder-only (use :meth:`answer`).
        """
        settings = settings or GenerationSettings()
        batch = self._prompt_batch(prompts, images, histories)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        out = self.model.generate(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_counts"],
            **self._generate_kwargs(settings),
        )
        return [self.processor.decode(self._trim(row)) for row in out]

    @property
    def generative(self) -> bool:
        """Whether the language backbone writes text (decoder-only or encoder-decoder)."""
        return self.model.language.spec.kind != "encoder"

    def classify(self, prompts: list[str], images: list[list[ImageLike]]) -> list[str]:
        """The most likely answer of the answer vocabulary for each prompt (encoder-only backbones).

        Raises:
            ValueError: the backbone is not encoder-only.
        """
        batch = self._prompt_batch(prompts, images, None)
        logits = self.model.classify(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_counts"])
        return [self.processor.answers[i] for i in logits.argmax(-1).tolist()]

    def answer(self, prompts: list[str], images: list[list[ImageLike]], settings: GenerationSettings | None = None) -> list[str]:
        """Answers for a batch: generated text, or the classified answer for encoder-only backbones."""
        return self.generate(prompts, images, settings) if self.generative else self.classify(prompts, images)

    def match_scores(self, images: list[ImageLike], texts: list[str], template: str = "plain") -> list[float]:
        """Probability that each text describes its image (encoder-only ITM head). Each pair is
        rendered as in training: a user turn holding the image, the text as the reply (``template``)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        chat = TEMPLATES.get(template)
        encoded = [
            self.processor.encode([Message("user", "<image>"), Message("assistant", t)], [as_image(i)], chat, as_pair=True)
            for i, t in zip(images, texts)
        ]
        batch = self._collate(encoded)
        scores = self.model.match_scores(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_counts"])
        return scores.tolist()

    def _trim(self, row: torch.Tensor) -> list[int]:
        stops = set(self.processor.stop_token_ids())
        ids = []
        for t in row.tolist():
            if t in stops:
                break
            ids.append(t)
        text = self.processor.tokenizer.decode(ids)
        for s in self.processor.template.stop_strings(self.processor.tokenizer):
            if s and s in text:
                return self.processor.tokenizer(text[: text.index(s)], add_special_tokens=False)["input_ids"]
        return ids

    def chat(
        self,
        image: ImageLike | list[ImageLike] | None,
        prompt: str,
        history: list[Message] | None = None,
        **settings: Any,
    ) -> str:
        """Answer one prompt about one image (or several, or none). ``settings`` as :class:`GenerationSettings`."""
        images = [] if image is None else image if isinstance(image, list) else [image]
        return self.generate([prompt], [images], GenerationSettings(**settings), [history or []])[0]
