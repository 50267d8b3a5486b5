"""vlmkit: build, train, evaluate and serve multimodal LLMs.

Quick use::

    import vlmkit
    pipe = vlmkit.load("runs/easyvqa-tiny/model")
    print(pipe.chat("image.png", "what shape is in the image?"))
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path: str, device: str | None = None, dtype: str | None = None, allow_pickle: bool = False):
    """Load a model folder as a :class:`vlmkit.inference.pipeline.VLMPipeline`: vlmkit's own, a
    transformers LLaVA or BLIP-2 folder, or an original LLaVA checkpoint (pickled ``.bin`` weights
    only with ``allow_pickle``, read with ``torch.load(weights_only=True)``)."""
    from vlmkit.inference.pipeline import VLMPipeline

    return VLMPipeline.from_pretrained(path, device=device, dtype=dtype, allow_pickle=allow_pickle)


__all__ = ["__version__", "load"]
