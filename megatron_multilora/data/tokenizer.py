"""Tokenizers behind one small interface: ``vocab_size``, ``eos_id``, ``pad_id``, ``encode``, ``encode_split``,
``encode_chat``, ``decode``.

The byte-level tokenizer needs no download, so tests, CI and demos run anywhere; real runs point at the
base model's Hugging Face ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

# Tried in order when the caller does not name the eos / pad token (base-model conventions first).
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; two special ids follow them."""

    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_split(self, text: str, split: int) -> tuple[list[int], list[bool]]:
        """The ids of ``text`` and, for each, whether it holds text from character ``split`` on."""
        ids, first = self.encode(text), len(text[:split].encode("utf-8"))
        return ids, [i >= first for i in range(len(ids))]

    def encode_chat(self, messages: list[dict], tools=None, documents=None) -> tuple[list[int], list[bool]]:
        raise ValueError("'messages' need the base model's chat template: the byte-level tokenizer has none (give "
                         "--tokenizer, a tokenizer.json with its tokenizer_config.json)")

    def describe(self) -> str:
        return "byte-level"

    def decode(self, ids) -> str:
        """Special ids are dropped; broken UTF-8 (e.g. a truncated character) becomes U+FFFD."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library, encoding a sample as transformers
    does: its post-processor's bos first, and no truncation or padding a file may have stored (transformers
    resets both on every call; kept, they would cut and pad every sample). See :meth:`encode_split`.

    ``eos`` / ``pad`` may be given as a token string or an id; otherwise the ``eos_token`` of a
    ``tokenizer_config.json`` beside the file (the model's own, e.g. a chat model's end of turn), else common
    special tokens are looked up. Without a pad token the eos id pads, which is harmless because padding never
    carries loss.
    """

    def __init__(self, path, eos: str | int | None = None, pad: str | int | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        self._tokenizer = Tokenizer.from_file(str(self.path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._special_id("eos", eos if eos is not None else self._configured_eos(), _EOS_CANDIDATES)
        self._prefix = self._template_prefix()
        self._chat = None  # (its chat template, compiled when a conversation first needs it)
        if pad is None and not any(self._tokenizer.token_to_id(t) is not None for t in _PAD_CANDIDATES):
            self.pad_id = self.eos_id
        else:
            self.pad_id = self._special_id("pad", pad, _PAD_CANDIDATES)

    def _special_id(self, role: str, given: str | int | None, candidates: tuple[str, ...]) -> int:
        if isinstance(given, int):
            if not 0 <= given < self.vocab_size:
                raise ValueError(f"{self.path}: {role} id {given} not in [0, {self.vocab_size})")
            return given
        for token in (given,) if given is not None else candidates:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        wanted = repr(given) if given is not None else f"any of {', '.join(candidates)}"
        raise ValueError(f"{self.path}: no {role} token found ({wanted}); pass {role}= explicitly")

    def _template_prefix(self) -> list[int]:
        """What the post-processor puts before a text (a bos), seen around a word of the vocabulary ("a" may be
        none, and a vocabulary without an unknown token cannot encode it)."""
        added = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        words = ["a", next((w for w in self._tokenizer.get_vocab() if w not in added), "a")]
        for word in words:
            try:
                probe = self._tokenizer.encode(word, add_special_tokens=True)
            except Exception:  # noqa: BLE001 - the tokenizers library raises its own, untyped errors
                continue
            text = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
            if text:
                return probe.ids[:text[0]]
        return []

    def _config_tokens(self) -> dict[str, str]:
        """The special token strings of the tokenizer_config.json beside the file (``eos_token``, ``bos_token``,
        ...), as a chat template reads them."""
        config = self.path.parent / "tokenizer_config.json"
        try:
            fields = json.loads(config.read_text()) if config.is_file() else {}
            fields = {k: v for k, v in fields.items() if k.endswith("_token")}
        except (OSError, ValueError, AttributeError):
            return {}  # (not the model's config we know)
        tokens = {k: v.get("content") if isinstance(v, dict) else v for k, v in fields.items()}
        return {k: v for k, v in tokens.items() if isinstance(v, str)}

    def _configured_eos(self) -> str | None:
        token = self._config_tokens().get("eos_token")
        if token is not None and self._tokenizer.token_to_id(token) is None:
            raise ValueError(f"{self.path.parent / 'tokenizer_config.json'}: eos_token {token!r} is not in the "
                             f"vocabulary of {self.path}")
        return token

    def encode(self, text: str) -> list[int]:
        """Plain encoding, no special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_split(self, text: str, split: int) -> tuple[list[int], list[bool]]:
        """The ids of ``text`` as the model reads a sample and, for each, whether it holds text from character
        ``split`` on: ``text`` is encoded whole, so a prompt and its completion tokenize as they do together
        (apart, a word piece or space could split at the seam). The post-processor's bos comes first unless the
        text begins with it already (chat-template output); what it puts after the text (an eos) is left to the
        caller, which ends a sample with a trained eos."""
        ids, trained = self._encode_spans(text, [(split, len(text))])
        prefix = [] if ids[:len(self._prefix)] == self._prefix else self._prefix
        return prefix + ids, [False] * len(prefix) + trained

    def encode_chat(self, messages: list[dict], tools=None, documents=None) -> tuple[list[int], list[bool]]:
        """A conversation's ids as transformers' ``apply_chat_template(messages, tools=..., tokenize=True)`` gives
        them (the template puts any bos itself) and, for each, whether it holds assistant text (data/chat.py)."""
        if self._chat is None:
            from .chat import ChatTemplate, read_chat_template

            source = read_chat_template(self.path.parent)
            if source is None:
                raise ValueError(f"'messages' need the base model's chat template: none beside {self.path} (a "
                                 "chat_template.jinja, or chat_template in its tokenizer_config.json)")
            self._chat = ChatTemplate(source, self._config_tokens())
        return self._encode_spans(*self._chat.trained_spans(messages, tools, documents))

    def _encode_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        """The ids of ``text`` (no special tokens added) and, for each, whether it holds text of a [start, end)
        span. (An added token that strips the whitespace after it, a chat role marker, holds the span's text only
        if its own text does.)"""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        trained = []
        for start, end in encoding.offsets:
            own_end = start + len(text[start:end].rstrip())
            trained.append(any(max(start, a) < min(end if start >= a else own_end, b) for a, b in spans))
        return list(encoding.ids), trained

    def describe(self) -> str:
        bos = [self._tokenizer.id_to_token(i) for i in self._prefix]
        return (f"{self.path} ({self.vocab_size} tokens, eos {self._tokenizer.id_to_token(self.eos_id)!r}"
                + (f", each sample begins with {bos}" if bos else "") + ")")

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def build_tokenizer(spec=None):
    """``None`` or ``"byte"`` -> :class:`ByteTokenizer`; a ``tokenizer.json`` path, or a directory holding
    one (e.g. a Hugging Face model directory) -> :class:`HFTokenizer`."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    return HFTokenizer(path / "tokenizer.json" if path.is_dir() else path)
