"""vlmkit chat templates as Hugging Face Jinja chat templates.

:func:`chat_template_jinja` turns a :class:`~vlmkit.processing.templates.FormatTemplate` into a Jinja
string ``J`` such that::

    tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=g, chat_template=J)

is exactly ``"".join(t for t, _ in template.segments(msgs, tokenizer, g))`` for every conversation
vlmkit accepts (optional system message, the template's default system prompt when there is none,
any number of turns, ``<image>`` placeholders). One generator reads the template's fields; nothing
is written per template. ``messages`` may carry string content (with literal ``<image>``
placeholders) or transformers' list content: parts render in order, ``{"type": "image"}`` as
``<image>\\n`` and ``{"type": "text", "text": t}`` as ``t``, so ``[image, text "q"]`` renders like
``VLMProcessor.prompt("q", [img])`` (``"<image>\\nq"``); other part types raise. ``bos`` templates
start with ``{{ bos_token }}`` and ``{eos}`` renders ``{{ eos_token }}`` (empty when the tokenizer has
none, as in vlmkit).

Where vlmkit refuses a conversation, the Jinja is lenient in one HF-idiomatic way: a conversation
that ends with a user turn and ``add_generation_prompt=False`` renders without the assistant prefix
(vlmkit raises, since it cannot train on it). Roles out of order, a misplaced system message or an
empty conversation raise ``jinja2.TemplateError`` (via ``raise_exception``) as vlmkit raises
:class:`TemplateError`. As in vlmkit, ``add_generation_prompt`` after a final assistant turn adds nothing.

The ``tokenizer`` template is the tokenizer's own ``chat_template``, returned unchanged: list
content is only as supported as that template supports it.

The Jinja uses only what transformers' sandbox offers (``ImmutableSandboxedEnvironment`` with
``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``, ``namespace``); every tag strips the
template's own whitespace (``{%- -%}``) and all text is emitted from string literals, so neither
setting changes the output.

Special tokens when tokenizing (transformers 5.23):

* ``tokenizer.apply_chat_template(..., tokenize=True)`` (which returns a ``BatchEncoding`` by default,
  ``return_dict=True``) always encodes the rendered text with ``add_special_tokens=False``: the ids are
  exactly the template's text tokenized, as :meth:`VLMProcessor.tokenize` does; a BOS rendered by
  ``{{ bos_token }}`` is not doubled even when the tokenizer's post-processor adds BOS.
* ``ProcessorMixin.apply_chat_template(..., tokenize=True)`` (e.g. ``LlavaProcessor``) passes
  ``add_special_tokens=False`` only when the rendered text starts with ``tokenizer.bos_token``;
  otherwise it calls the processor with the tokenizer's default (``True``). So for a template
  without ``bos`` (``chatml``, ``qa``, ``plain``) and a tokenizer whose post-processor adds BOS (or EOS,
  like T5), the processor's ids gain that token and differ from vlmkit's; pass
  ``processor_kwargs={"add_special_tokens": False}`` to get vlmkit's ids. With a ``bos`` template
  (``vicuna_v1``, ``llama3``) the ids match.
* ``processor(text=rendered, images=...)`` called directly uses ``add_special_tokens=True``: a BOS
  already rendered by the template is doubled by such a tokenizer; pass ``add_special_tokens=False``.

Tokenizers whose post-processor adds nothing (vlmkit's trained byte-level BPE) give the same ids on
every path.
"""

from __future__ import annotations

import string
from typing import Any

from vlmkit.processing.templates import ChatTemplate, FormatTemplate, TemplateError, TokenizerTemplate
from vlmkit.processing.tokenizer import IMAGE_TOKEN

# the fields each format string may use, as FormatTemplate.segments fills them
_FORMAT_FIELDS = {"system": ("content",), "user": ("content", "eos"), "assistant": ("content", "eos")}

_CONTENT_MACRO = """\
{%- macro vlm_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] == 'image' -%}
                {{- IMAGE_LINE -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- else -%}
                {{- raise_exception('vlmkit templates render only image and text content parts, not ' ~ part['type']) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
"""


def chat_template_jinja(template: ChatTemplate, tokenizer: Any, system_prompt: str | None = None) -> str:
    """A Jinja chat template that renders conversations exactly as ``template`` does.

    Args:
        template: a :class:`FormatTemplate` (Jinja generated from its fields) or the
            :class:`TokenizerTemplate` (the tokenizer's own ``chat_template``, unchanged).
        tokenizer: the tokenizer the template renders for (``tokenizer`` template only; the Jinja of a
            FormatTemplate reads ``bos_token``/``eos_token`` at render time).
        system_prompt: the system message used when a conversation has none, as
            :class:`VLMProcessor`'s ``system_prompt``: ``None`` keeps the template's default, ``""``
            means none.

    Returns:
        The Jinja source (a ``str``), for ``tokenizer.chat_template`` / a processor's ``chat_template``.

    Raises:
        TemplateError: the ``tokenizer`` template with a tokenizer that has no chat template.
        ValueError: ``system_prompt`` with the ``tokenizer`` template (its Jinja cannot be given a
            default system message); a format string using a field vlmkit would not fill, a positional
            field, or a format spec / conversion.
        TypeError: any other ChatTemplate subclass.
    """
    if isinstance(template, TokenizerTemplate):
        if system_prompt is not None:
            raise ValueError(
                "system_prompt cannot be applied to the 'tokenizer' template (its Jinja is the tokenizer's own); "
                "add the system message to the conversation instead"
            )
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        if not own:
            raise TemplateError("template 'tokenizer' needs a tokenizer with a chat_template; choose a named template")
        return own
    if not isinstance(template, FormatTemplate):
        raise TypeError(f"cannot write a Jinja template for {type(template).__name__}; expected a FormatTemplate")
    if template.images_first or template.tokenizer_specials:
        raise ValueError(f"template {template.name!r} moves images before the BOS token, which a chat template cannot express; "
                         "its prompts are built by the processor (BLIP-2's Blip2Processor does the same)")
    return _format_template_jinja(template, template.default_system if system_prompt is None else system_prompt)


def _format_template_jinja(t: FormatTemplate, default_system: str) -> str:
    out = [
        f"{{#- vlmkit chat template {t.name!r}, generated by vlmkit.processing.jinja.chat_template_jinja -#}}\n",
        _CONTENT_MACRO.replace("IMAGE_LINE", _literal(IMAGE_TOKEN + "\n")),
    ]
    if t.bos:
        out.append("{%- if bos_token -%}{{- bos_token -}}{%- endif -%}\n")
    # the system message is messages[0] only; elsewhere the role check below rejects it
    out.append(f"{{%- set ns = namespace(system={_literal(default_system)}, start=0) -%}}\n")
    out.append("{%- if messages and messages[0]['role'] == 'system' -%}\n")
    out.append("    {%- set ns.system = vlm_content(messages[0]['content']) -%}\n")
    out.append("    {%- set ns.start = 1 -%}\n")
    out.append("{%- endif -%}\n")
    if t.system:
        out.append("{%- if ns.system -%}\n")
        out.append(f"    {_render_format(t.system, 'system', 'ns.system')}\n")
        if t.first_separator:
            out.append(f"    {{{{- {_literal(t.first_separator)} -}}}}\n")
        out.append("{%- endif -%}\n")
    out.append("{%- for message in messages[ns.start:] -%}\n")
    out.append("    {%- if message['role'] == 'user' and loop.index0 % 2 == 0 -%}\n")
    out.append("        {%- set content = vlm_content(message['content']) -%}\n")
    if t.images_only_user:
        # only the placeholders of a user turn are kept (``plain``): count them by splitting
        image = _literal(IMAGE_TOKEN)
        out.append(f"        {{%- set content = {image} * (content.split({image}) | length - 1) -%}}\n")
    out.append(f"        {_render_format(t.user, 'user', 'content')}\n")
    if t.assistant_prefix:
        # vlmkit opens the assistant turn after every user turn; the last one only when asked to
        out.append("        {%- if not loop.last or add_generation_prompt -%}\n")
        out.append(f"            {{{{- {_literal(t.assistant_prefix)} -}}}}\n")
        out.append("        {%- endif -%}\n")
    out.append("    {%- elif message['role'] == 'assistant' and loop.index0 % 2 == 1 -%}\n")
    out.append("        {%- set content = vlm_content(message['content']) -%}\n")
    out.append(f"        {_render_format(t.assistant, 'assistant', 'content')}\n")
    if t.assistant_suffix:
        out.append(f"        {{{{- {_literal(t.assistant_suffix)} -}}}}\n")
    out.append("    {%- else -%}\n")
    out.append(
        "        {{- raise_exception('message ' ~ (loop.index0 + ns.start) ~ ' has role ' ~ message['role'] ~ "
        "'; after an optional system message, user and assistant alternate, starting with user') -}}\n"
    )
    out.append("    {%- endif -%}\n")
    out.append("{%- else -%}\n")
    out.append("    {{- raise_exception('the conversation is empty: it needs at least one user message') -}}\n")
    out.append("{%- endfor -%}\n")
    return "".join(out)


def _render_format(fmt: str, field: str, content_var: str) -> str:
    """Jinja for ``fmt.format(content=..., eos=...)`` with ``{content}`` read from ``content_var``."""
    allowed = _FORMAT_FIELDS[field]
    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(fmt):
        if literal:
            parts.append(f"{{{{- {_literal(literal)} -}}}}")
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            raise ValueError(
                f"template field {field}={fmt!r} uses {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}; it may use only {', '.join('{' + a + '}' for a in allowed)}"
            )
        if name == "content":
            parts.append(f"{{{{- {content_var} -}}}}")
        else:
            parts.append("{%- if eos_token -%}{{- eos_token -}}{%- endif -%}")
    return "".join(parts)


def _literal(text: str) -> str:
    """``text`` as a single-quoted Jinja string literal.

    Jinja decodes literals with Python's ``unicode-escape`` (after normalising raw newlines), so every
    character outside printable ASCII is written as an escape; braces, ``%`` and ``#`` are escaped too
    so the template source never shows a delimiter inside a literal.
    """
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif ch == "\n":
            out.append("\\n")
        elif ch in "{}%#":
            out.append(f"\\x{code:02x}")
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "'" + "".join(out) + "'"
