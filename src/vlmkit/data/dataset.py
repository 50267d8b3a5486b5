"""Encoded datasets, resumable batch order and collation."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from vlmkit.data.sources import SOURCES, DataError, Sample, SourceResult
from vlmkit.config import DataConfig
from vlmkit.processing.augment import Augmenter
from vlmkit.processing.image import ImageError, load_image
from vlmkit.processing.processor import EncodingError, VLMProcessor
from vlmkit.processing.templates import ChatTemplate, TemplateError

log = logging.getLogger("vlmkit")


def load_source(cfg: DataConfig) -> SourceResult:
    """Run the configured source (``data.source``) and log how many rows were skipped and why."""
    result = SOURCES.get(cfg.source)(cfg)
    if result.skipped:
        log.warning("data: skipped %d bad row(s) of %s; first: %s", len(result.skipped), cfg.path or cfg.source, result.skipped[0])
    if not result.samples:
        raise DataError(f"data source {cfg.source!r} ({cfg.path or cfg.split}) produced no samples")
    return result


class ConversationDataset(Dataset):
    """Encodes samples on access. ``__getitem__`` returns an ``Encoded`` or, for a bad row when
    ``skip_bad_rows`` is set, ``None`` (the collate function drops and counts it).

    Args:
        samples: validated conversations.
        processor: encodes them.
        template: template for this data (e.g. ``plain`` in stage 1); ``None`` uses the processor's.
        skip_bad_rows: skip rows whose image cannot be read or whose encoding fails.
        cache_images: keep transformed image tensors in memory by path.
        augment: names of :data:`~vlmkit.processing.augment.AUGMENTATIONS` applied to each image every
            time it is drawn (after the cache, so cached images stay unaugmented).

    Raises (from ``__getitem__`` without ``skip_bad_rows``):
        DataError: naming the sample's file/row and the problem.
    """

    def __init__(
        self,
        samples: list[Sample],
        processor: VLMProcessor,
        template: ChatTemplate | None = None,
        skip_bad_rows: bool = False,
        cache_images: bool = False,
        augment: Sequence[str] = (),
    ):
        self.samples = samples
        self.processor = processor
        self.template = template
        self.skip_bad_rows = skip_bad_rows
        self.cache: dict[str, torch.Tensor] | None = {} if cache_images else None
        self.augment = Augmenter(augment)

    def __len__(self) -> int:
        return len(self.samples)

    def _pixels(self, path: str) -> torch.Tensor:
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        pixels = self.processor.image_transform(load_image(path))
        if self.cache is not None:
            self.cache[path] = pixels
        return pixels

    def __getitem__(self, key: int | tuple[int, int]):
        """The encoded sample ``key`` (an index), or ``(index, draw)`` from :class:`GlobalBatchSampler`:
        ``draw`` seeds the sample's augmentations, so they depend on (seed, epoch, index) only, not on
        the order samples are drawn in, the worker that draws them, or where a run resumed."""
        index, draw = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        try:
            images = [self._pixels(p) for p in sample.images]
            if self.augment:
                generator = None if draw is None else torch.Generator().manual_seed(draw * 1_000_003 + index)
                images = [self.augment(x, generator) for x in images]
            return self.processor.encode(sample.messages, images, template=self.template)
        except (ImageError, EncodingError, TemplateError) as exc:
            if self.skip_bad_rows:
                return None
            raise DataError(f"{sample.origin}: {exc} (set data.skip_bad_rows=true to skip such rows)") from None


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """One process's micro-batches of an epoch of global batches; the order depends only on
    ``(seed, epoch)``, never on the number of processes.

    Global batch ``k`` is ``order[k * global_batch : (k + 1) * global_batch]`` of the epoch's
    permutation (the last one may be short). It is cut into ``processes x accumulation`` parts as even
    as :func:`torch.tensor_split` makes them; micro-step ``j`` of process ``r`` is part
    ``j * processes + r``. So for full batches every part holds ``micro_batch`` samples, and a short
    last batch is shared out instead of dropped; a part may then be empty (the trainer runs a
    target-free filler there, so every process takes the same number of forward passes).

    Items are ``(index, draw)`` pairs; ``draw`` (:attr:`draw_seed`, one per epoch) seeds each
    sample's augmentations. Resume mid-epoch with accelerate's ``skip_first_batches`` (``accumulation``
    micro-batches per step done).
    """

    def __init__(self, size: int, global_batch: int, accumulation: int, seed: int, epoch: int = 0,
                 processes: int = 1, rank: int = 0):
        if size < 1 or global_batch < 1 or accumulation < 1:
            raise ValueError(f"size, global batch and accumulation must be >= 1 (got {size}, {global_batch}, {accumulation})")
        self.size, self.global_batch, self.accumulation = size, global_batch, accumulation
        self.seed, self.epoch, self.processes, self.rank = seed, epoch, processes, rank

    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) in one pass over the data; the last may be short."""
        return -(-self.size // self.global_batch)

    def __len__(self) -> int:
        return self.steps_per_epoch() * self.accumulation

    @property
    def draw_seed(self) -> int:
        return self.seed * 100_003 + self.epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(self.draw_seed)
        order = torch.randperm(self.size, generator=gen)
        parts_per_batch = self.processes * self.accumulation
        for k in range(self.steps_per_epoch()):
            parts = torch.tensor_split(order[k * self.global_batch : (k + 1) * self.global_batch], parts_per_batch)
            for j in range(self.accumulation):
                yield [(i, self.draw_seed) for i in parts[j * self.processes + self.rank].tolist()]


class Collator:
    """Drops skipped (``None``) samples, pads the rest and records how many were skipped."""

    def __init__(self, processor: VLMProcessor, padding_side: str = "right"):
        self.processor = processor
        self.padding_side = padding_side

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        kept = [x for x in items if x is not None]
        batch: dict[str, Any] = self.processor.collate(kept, self.padding_side) if kept else {}
        batch["num_skipped"] = len(items) - len(kept)
        batch["num_samples"] = len(kept)
        return batch
