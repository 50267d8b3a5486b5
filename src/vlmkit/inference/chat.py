"""Interactive chat: a multi-turn session about one image, with a few slash commands."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from vlmkit.inference.pipeline import VLMPipeline, as_image
from vlmkit.processing.templates import Message

HELP = "commands: /image PATH (new image, new conversation), /reset, /help, /quit"


def run_repl(
    pipe: VLMPipeline, image_path: str | None, settings: dict[str, Any], stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    """Read prompts line by line and answer them, keeping the conversation as history.

    The image is attached to the first turn only, as in training data; ``/image`` starts over.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    image = as_image(image_path) if image_path else None
    history: list[Message] = []
    interactive = stdin.isatty()
    print(f"vlmkit chat ({'image: ' + image_path if image_path else 'no image'}). {HELP}", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/help":
            print(HELP, file=stdout)
            continue
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=stdout)
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            try:
                image = as_image(path)
            except ValueError as exc:
                print(f"error: {exc}", file=stdout)
                continue
            image_path, history = path, []
            print(f"(new conversation about {path})", file=stdout)
            continue
        images = [image] if image is not None else []
        if image is not None and not history and "<image>" not in text:
            text = "<image>\n" + text
        answer = pipe.generate([text], [images], _settings(settings), [history])[0]
        history = [*history, Message("user", text), Message("assistant", answer)]
        print(f"assistant> {answer}", file=stdout, flush=True)


def _settings(settings: dict[str, Any]):
    from vlmkit.inference.pipeline import GenerationSettings

    return GenerationSettings(**settings)
