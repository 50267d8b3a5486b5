"""Images, chat templates, tokenizers and the processor."""
