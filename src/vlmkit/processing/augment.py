"""Training-time image augmentations on normalised pixel tensors ``(3, S, S)``.

An augmentation is a function ``(pixels, generator) -> pixels`` registered in :data:`AUGMENTATIONS`
and named in ``data.augment``. They draw from the torch generator they are given (the global one by
default); training gives each sample a generator seeded by (seed, epoch, index)
(:class:`~vlmkit.data.dataset.ConversationDataset`), so an augmented run resumes with the same draws.
Only label-preserving geometric changes are offered: they suit data whose text does not mention
left/right or orientation (easy-VQA's shapes and colours); captions that say "on the left" need none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vlmkit.registry import Registry

Augmentation = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]
AUGMENTATIONS: Registry[Augmentation] = Registry("image augmentation")


def _coin(generator: torch.Generator | None) -> bool:
    return bool(torch.rand((), generator=generator) < 0.5)


@AUGMENTATIONS.register("hflip")
def hflip(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror left-right with probability 1/2."""
    return pixels.flip(-1) if _coin(generator) else pixels


@AUGMENTATIONS.register("vflip")
def vflip(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror top-bottom with probability 1/2."""
    return pixels.flip(-2) if _coin(generator) else pixels


@AUGMENTATIONS.register("rot90")
def rot90(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate by 0, 90, 180 or 270 degrees, uniformly (square images only)."""
    k = int(torch.randint(4, (), generator=generator))
    return torch.rot90(pixels, k, dims=(-2, -1)) if k else pixels


class Augmenter:
    """The named augmentations applied in order.

    Raises:
        RegistryError: an unknown name (the message lists the valid ones).
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.steps = [AUGMENTATIONS.get(n) for n in self.names]

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``pixels`` augmented with draws from ``generator`` (default: torch's global generator)."""
        for step in self.steps:
            pixels = step(pixels, generator)
        return pixels
