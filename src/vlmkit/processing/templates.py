"""Chat templates: a conversation -> text segments, each marked as trained-on or context.

A template renders ``[(text, train)]`` segments. The processor tokenizes the joined text once and
marks a token as a label when its first character lies in a ``train`` segment, so the mask is exact
whatever the tokenizer merges. Assistant turns are trained on, including the string that ends the
turn (so the model learns to stop); everything else is context.

Named templates are data (:class:`FormatTemplate`); ``tokenizer`` uses the tokenizer's own Jinja
chat template and finds assistant spans by rendering growing prefixes of the conversation.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any

from vlmkit.registry import Registry

ROLES = ("system", "user", "assistant")
Segment = tuple[str, bool]


class TemplateError(ValueError):
    """A conversation cannot be rendered by a template; the message says why."""


@dataclass(frozen=True)
class Message:
    """One chat message. ``content`` may contain ``<image>`` placeholders."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise TemplateError(f"message role {self.role!r} is not valid; roles: {', '.join(ROLES)}")


def check_conversation(messages: list[Message], for_generation: bool = False) -> None:
    """Validate order: optional system first, then user/assistant alternating, starting with user.

    Raises:
        TemplateError: empty conversation, misplaced system message, or roles out of order.
    """
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if not body:
        raise TemplateError("the conversation is empty: it needs at least one user message")
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg.role != expected:
            raise TemplateError(
                f"message {i + (len(messages) - len(body))} has role {msg.role!r} where {expected!r} was expected "
                "(after an optional system message, user and assistant alternate, starting with user)"
            )
    if not for_generation and body[-1].role != "assistant":
        raise TemplateError("a training conversation must end with an assistant message")


class ChatTemplate(abc.ABC):
    """Renders conversations. ``stop`` lists strings that end an assistant turn."""

    name: str
    stop: tuple[str, ...]

    @abc.abstractmethod
    def segments(self, messages: list[Message], tokenizer: Any, add_generation_prompt: bool = False) -> list[Segment]:
        """``[(text, train)]`` for ``messages``; with ``add_generation_prompt`` the text ends where the
        assistant's reply begins."""

    @abc.abstractmethod
    def stop_strings(self, tokenizer: Any) -> tuple[str, ...]:
        """Strings that end an assistant turn for this tokenizer."""


@dataclass(frozen=True)
class FormatTemplate(ChatTemplate):
    """A template described by format strings.

    Attributes:
        name: registry id.
        system: format of the system block (``{content}``); empty string drops system messages.
        user: format of a user turn.
        assistant_prefix: context text that opens an assistant turn (the generation prompt).
        assistant: trained format of the assistant's reply (``{content}``, ``{eos}``).
        assistant_suffix: context text after the reply.
        default_system: system message used when the conversation has none.
        bos: prepend the tokenizer's BOS token.
        stop: strings that end the assistant's turn.
        images_only_user: keep only the ``<image>`` placeholders of user turns (``plain``).
        first_separator: text between the system block and the first turn.
        images_first: move every user turn's ``<image>`` placeholders (and the newline after each) to
            the very start, before the BOS token (BLIP-2's processor puts the query tokens there).
        tokenizer_specials: wrap the prompt (after the images, up to where the last reply starts) in
            the special tokens the tokenizer itself adds to a text (OPT's BOS before, T5's EOS after),
            as ``tokenizer(prompt)`` does in processors that take plain text (BLIP-2).

    ``user`` and ``assistant`` may use ``{eos}`` (the tokenizer's EOS token) as well as ``{content}``.
    """

    name: str
    system: str
    user: str
    assistant_prefix: str
    assistant: str
    assistant_suffix: str = ""
    default_system: str = ""
    bos: bool = False
    stop: tuple[str, ...] = ()
    images_only_user: bool = False
    first_separator: str = ""
    images_first: bool = False
    tokenizer_specials: bool = False

    def segments(self, messages: list[Message], tokenizer: Any, add_generation_prompt: bool = False) -> list[Segment]:
        check_conversation(messages, for_generation=add_generation_prompt)
        eos = getattr(tokenizer, "eos_token", None) or ""
        out: list[Segment] = []
        if self.images_first:
            count = sum(m.content.count("<image>") for m in messages if m.role == "user")
            messages = [Message(m.role, m.content.replace("<image>\n", "").replace("<image>", "")) if m.role == "user" else m
                        for m in messages]
            out.append(("<image>" * count, False))
        if self.bos and getattr(tokenizer, "bos_token", None):
            out.append((tokenizer.bos_token, False))
        before, after = _tokenizer_specials(tokenizer) if self.tokenizer_specials else ("", "")
        out.append((before, False))
        last_user = max(i for i, m in enumerate(messages) if m.role == "user")
        body = messages
        system = self.default_system
        if messages[0].role == "system":
            system, body = messages[0].content, messages[1:]
        if system and self.system:
            out.append((self.system.format(content=system) + self.first_separator, False))
        for msg in body:
            if msg.role == "user":
                content = msg.content
                if self.images_only_user:
                    content = "<image>" * content.count("<image>")
                out.append((self.user.format(content=content, eos=eos) + self.assistant_prefix, False))
                if msg is messages[last_user]:
                    out.append((after, False))
            else:
                out.append((self.assistant.format(content=msg.content, eos=eos), True))
                if self.assistant_suffix:
                    out.append((self.assistant_suffix, False))
        return [(t, m) for t, m in out if t]

    def stop_strings(self, tokenizer: Any) -> tuple[str, ...]:
        eos = getattr(tokenizer, "eos_token", None) or ""
        return tuple(s.format(eos=eos) for s in self.stop if s.format(eos=eos))


def _tokenizer_specials(tokenizer: Any) -> tuple[str, str]:
    """The special tokens ``tokenizer`` adds before and after a text, as strings."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), 0)
    as_text = lambda ids: "".join(tokenizer.convert_ids_to_tokens(ids))  # noqa: E731  (special tokens are whole tokens)
    return as_text(full[:start]), as_text(full[start + len(bare):])


@dataclass(frozen=True)
class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own Jinja chat template.

    Assistant spans are found by rendering ``messages[:i]`` with a generation prompt and
    ``messages[:i+1]`` without: the difference is the reply plus its end marker. Raises
    :class:`TemplateError` when the template is not prefix-stable (rendering a prefix changes earlier
    text), since spans could not be located exactly.
    """

    name: str = "tokenizer"
    stop: tuple[str, ...] = ()

    def _render(self, tokenizer: Any, messages: list[Message], gen: bool) -> str:
        conv = [{"role": m.role, "content": m.content} for m in messages]
        return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)

    def segments(self, messages: list[Message], tokenizer: Any, add_generation_prompt: bool = False) -> list[Segment]:
        check_conversation(messages, for_generation=add_generation_prompt)
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'tokenizer' needs a tokenizer with a chat_template; choose a named template")
        full = self._render(tokenizer, messages, add_generation_prompt)
        out: list[Segment] = []
        pos = 0
        for i, msg in enumerate(messages):
            if msg.role != "assistant":
                continue
            start_text = self._render(tokenizer, messages[:i], True)
            end_text = self._render(tokenizer, messages[: i + 1], False)
            if not (full.startswith(start_text) and full.startswith(end_text) and end_text.startswith(start_text)):
                raise TemplateError(
                    "the tokenizer's chat template is not prefix-stable (rendering a shorter conversation changes "
                    "earlier text), so assistant tokens cannot be located; choose a named template instead"
                )
            start, end = len(start_text), len(end_text)
            # the trailing newline after an end marker is context, as in the named templates
            reply = full[start:end]
            stripped = reply.rstrip("\n")
            out.append((full[pos:start], False))
            out.append((stripped, True))
            pos = start + len(stripped)
        out.append((full[pos:], False))
        return [(t, m) for t, m in out if t]

    def stop_strings(self, tokenizer: Any) -> tuple[str, ...]:
        stops = []
        for tok in (getattr(tokenizer, "eos_token", None), "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            if tok and tok in tokenizer.get_vocab():
                stops.append(tok)
        return tuple(dict.fromkeys(stops))


TEMPLATES: Registry[ChatTemplate] = Registry("chat template")

TEMPLATES.register("tokenizer", TokenizerTemplate())
TEMPLATES.register(
    "plain",
    FormatTemplate(
        name="plain", system="", user="{content}", assistant_prefix="", assistant="{content}{eos}",
        images_only_user=True, stop=("{eos}",),
    ),
)
TEMPLATES.register(
    "qa",
    FormatTemplate(
        name="qa", system="{content}\n", user="Question: {content}", assistant_prefix=" Answer:",
        assistant=" {content}{eos}", assistant_suffix="\n", stop=("{eos}",),
    ),
)
# BLIP-2's prompts as Blip2Processor builds them: the query tokens first, then the tokenizer's own
# special tokens around "Question: ... Answer:" (OPT's BOS before it; T5's EOS after it)
TEMPLATES.register(
    "blip2",
    FormatTemplate(
        name="blip2", system="", user="Question: {content}", assistant_prefix=" Answer:", assistant=" {content}{eos}",
        images_first=True, tokenizer_specials=True, stop=("{eos}",),
    ),
)
VICUNA_V1 = FormatTemplate(
    name="vicuna_v1", system="{content}", first_separator=" ", user="USER: {content} ", assistant_prefix="ASSISTANT:",
    assistant=" {content}{eos}", bos=True, stop=("{eos}",),
    default_system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
)
TEMPLATES.register("vicuna_v1", VICUNA_V1)
# Bunny's "bunny" and LLaVA-Phi's "phi_v0" conversation (the same string): Vicuna v1's text with the
# tokenizer's end-of-text as the turn end and no BOS (Phi-2's tokenizer has none of its own)
TEMPLATES.register("bunny", dataclasses.replace(VICUNA_V1, name="bunny", bos=False))
TEMPLATES.register(
    "llama3",
    FormatTemplate(
        name="llama3", system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
        bos=True, stop=("<|eot_id|>",),
    ),
)
TEMPLATES.register(
    "chatml",
    FormatTemplate(
        name="chatml", system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant="{content}<|im_end|>", assistant_suffix="\n",
        stop=("<|im_end|>",),
    ),
)


def template_markers(name: str | None) -> tuple[str, ...]:
    """The ``<|...|>`` markers a named template writes (Llama 3's ``<|start_header_id|>`` ...), which a
    tokenizer trained for it should hold as special tokens; none for ``tokenizer``/``auto``/unknown."""
    import re

    template = TEMPLATES.get(name) if name and name in TEMPLATES else None
    if not isinstance(template, FormatTemplate):
        return ()
    text = " ".join(str(getattr(template, f)) for f in ("system", "user", "assistant_prefix", "assistant", "assistant_suffix"))
    return tuple(dict.fromkeys(re.findall(r"<\|[A-Za-z0-9_]+\|>", text)))


def resolve_template(name: str, tokenizer: Any, backbone_default: str) -> ChatTemplate:
    """``auto`` -> the tokenizer's template if it has one, else the backbone default; else by name."""
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return TEMPLATES.get("tokenizer")
        return TEMPLATES.get(backbone_default)
    return TEMPLATES.get(name)
