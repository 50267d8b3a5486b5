"""Tiny transformers VLMs built and saved by transformers itself, for the format tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from PIL import Image

from conftest import CORPUS
from vlmkit.processing.tokenizer import train_bpe_tokenizer

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bpe_tokenizer():
    return train_bpe_tokenizer(CORPUS, 400)


def image(seed: int = 0, size=(40, 28)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def save_hf_llava(folder: Path, tower: str = "clip", seed: int = 0, text_model_type: str = "llama",
                  feature_layer: int = -2, strategy: str | None = None) -> Path:
    """A random LlavaForConditionalGeneration + LlavaProcessor saved by transformers (no vlmkit code)."""
    torch.manual_seed(seed)
    tok = bpe_tokenizer()
    if tower == "clip":
        vc = transformers.CLIPVisionConfig(**TINY_CLIP)
        improc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        extra, strategy = 1, strategy or "default"
    else:
        vc = transformers.SiglipVisionConfig(**TINY_CLIP)
        improc = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
        extra, strategy = 0, strategy or "full"
    text = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[text_model_type](
        **TINY_LLAMA, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    config = transformers.LlavaConfig(vision_config=vc, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    transformers.LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy,
                                num_additional_image_tokens=extra, chat_template=CHATML_JINJA).save_pretrained(folder)
    return folder


def hf_inputs(folder: Path, question: str = "what shape is it?", seed: int = 0) -> dict[str, torch.Tensor]:
    processor = transformers.AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image(seed), text=prompt, return_tensors="pt")


TINY_BLIP2_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TINY_QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, cross_attention_frequency=2)


def t5_tokenizer():
    """The BPE tokenizer with T5's conventions: pad 0 as decoder start, EOS appended to every text."""
    from tokenizers import processors

    tok = bpe_tokenizer()
    tok.add_special_tokens({"eos_token": "</s>"})
    eos = tok.convert_tokens_to_ids("</s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)])
    return tok


def save_hf_blip2(folder: Path, text: str = "opt", seed: int = 0) -> Path:
    """A random Blip2ForConditionalGeneration + Blip2Processor saved by transformers (OPT or Flan-T5)."""
    torch.manual_seed(seed)
    if text == "opt":
        tok = bpe_tokenizer()
        tc = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                                    max_position_embeddings=256, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        tok = t5_tokenizer()
        tc = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                                   vocab_size=len(tok), feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    config = transformers.Blip2Config(vision_config=TINY_BLIP2_VISION, qformer_config={**TINY_QFORMER, "encoder_hidden_size": 32},
                                      text_config=tc.to_dict(), num_query_tokens=4,
                                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers starts the queries at zero; spread them so the parity check is meaningful
        model.query_tokens.normal_(0, 0.5)
    model.save_pretrained(folder)
    improc = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    transformers.Blip2Processor(image_processor=improc, tokenizer=tok, num_query_tokens=4).save_pretrained(folder)
    return folder
