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


def generate_kwargs(processor: VLMProcessor, params: Any) -> dict[str, Any]:
    """transformers ``generate`` arguments for :class:`~vlmkit.inference.engine.SamplingParams`
    ``params``: its length and sampling, the processor's stop tokens and multi-token stop strings."""
    tok = processor.tokenizer
    stop_ids = processor.stop_token_ids()
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "do_sample": not params.greedy,
        "eos_token_id": stop_ids or None,
        "pad_token_id": processor.pad_token_id,
    }
    single = {tok.convert_ids_to_tokens(i) for i in stop_ids}
    multi = [s for s in (*processor.stop_strings(), *params.stop) if s and s not in single]
    if multi:
        kwargs["stop_strings"] = multi
        kwargs["tokenizer"] = tok
    if params.greedy:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    return kwargs


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
        self._engine = None

    @property
    def engine(self):
        """The model's :class:`~vlmkit.inference.engine.Engine` (continuous batching), built on first use.

        Raises:
            NotGenerativeError: the backbone is encoder-only.
        """
        if self._engine is None:
            from vlmkit.inference.engine import Engine

            self._engine = Engine(self.model, self.processor)
        return self._engine

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
        """Answer prompts (each with its images) on the engine: continuous batching, one KV cache
        per row, greedy or sampled with a generator per prompt (``settings.seed``, never the global RNG).
        With ``use_cache=False``, the engine's reference path (each prompt alone, no KV cache).

        Raises:
            EncodingError: a prompt's placeholders do not match its images.
            NotGenerativeError: the model's language backbone is encoder-only (use :meth:`answer`).
        """
        from vlmkit.inference.engine import SamplingParams

        settings = settings or GenerationSettings()
        params = SamplingParams.from_settings(settings)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        hist = histories or [None] * len(prompts)
        encoded = [self.processor.prompt(p, [as_image(i) for i in imgs], hist[k]) for k, (p, imgs) in enumerate(zip(prompts, images))]
        return [c.text for c in self.engine.generate(encoded, params, use_cache=settings.use_cache)]

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
