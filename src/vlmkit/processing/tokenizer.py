"""Tokenizers: load a pretrained one, or train a small byte-level BPE for models built from scratch.

Every vlmkit tokenizer carries ``<image>`` as a special token; the processor expands it into as
many visual tokens as the connector emits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

IMAGE_TOKEN = "<image>"
BPE_EOS = "<|endoftext|>"
BPE_SPECIALS = (BPE_EOS, "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, extra_specials: Iterable[str] = ()) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    The result has ``<|endoftext|>`` as BOS/EOS/PAD, the ChatML markers and ``<image>`` as special
    tokens, and can encode any string (every byte is in the base alphabet). ``extra_specials``: more
    special tokens (a chat template's markers, e.g. Llama 3's ``<|eot_id|>``), after those.

    Raises:
        ValueError: ``vocab_size`` below 300.
    """
    extra = [t for t in dict.fromkeys(extra_specials) if t not in BPE_SPECIALS]
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (needs >= 300)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*BPE_SPECIALS, *extra],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", IMAGE_TOKEN, *extra],
    )


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """Load a (fast) tokenizer from a hub id or folder."""
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def prepare_tokenizer(tokenizer: Any, extra_special: Iterable[str] = ()) -> Any:
    """Make ``tokenizer`` ready for a VLM: ``<image>`` (and ``extra_special``) as special tokens, a pad token.

    Raises:
        ValueError: the tokenizer is not a fast tokenizer (offset mappings are needed for exact masks).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; vlmkit needs a fast one (offset mappings make label masks exact)"
        )
    missing = [t for t in (IMAGE_TOKEN, *extra_special) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
