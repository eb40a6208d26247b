"""Conversations (``{"messages": [{"role": ..., "content": ...}, ...]}``) rendered with the base model's chat
template as transformers' ``apply_chat_template`` renders them (a sandboxed Jinja environment with its globals and
its ``{% generation %}`` tag), and the characters an adapter learns: each assistant turn, from where the template's
prompt for it ends (``add_generation_prompt``) to its end-of-turn marker (the whitespace after the marker belongs to
the next turn). The template is the ``chat_template.jinja`` beside the tokenizer.json, else the ``chat_template`` of
the ``tokenizer_config.json`` there (its ``"default"`` when it lists several), as transformers reads them.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


def read_chat_template(directory: Path) -> str | None:
    """The chat template saved beside a tokenizer.json, or None."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class _GenerationTag(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (it marks assistant text): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled chat template with the tokenizer's special token strings (``bos_token``, ``eos_token``, ...)."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not compile: {e} (its line {e.lineno})") from None
        self._special_tokens = special_tokens

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools=None, documents=None) -> str:
        """As transformers renders (its None tools / documents included: templates test them)."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, documents=documents, **self._special_tokens)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, OverflowError, RecursionError) as e:
            raise ValueError(f"the chat template fails on these messages: {e}") from None

    def trained_spans(self, messages: list[dict], tools=None,
                      documents=None) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the [start, end) character spans of its assistant turns."""
        context = {"tools": tools, "documents": documents}
        text, spans = self.render(messages, **context), []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True, **context)
            through = self.render(messages[:i + 1], **context)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(f"the chat template does not render the conversation up to message {i} as the "
                                 "beginning of the whole (it rewrites earlier turns): give this sample as prompt / "
                                 "completion or input_ids / loss_mask")
            end = len(through.rstrip())
            if end > len(before):
                spans.append((len(before), end))
        if not spans:
            raise ValueError("'messages' has no assistant message with content: nothing to train on")
        return text, spans
