"""Tokenizers behind one small interface: ``vocab_size``, ``eos_id``, ``pad_id``, ``encode``, ``decode``.

The byte-level tokenizer needs no download, so tests, CI and demos run anywhere; real runs point at the
base model's Hugging Face ``tokenizer.json``.
"""

from __future__ import annotations

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

    def decode(self, ids) -> str:
        """Special ids are dropped; broken UTF-8 (e.g. a truncated character) becomes U+FFFD."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library.

    ``eos`` / ``pad`` may be given as a token string or an id; otherwise common special tokens are looked
    up. Without a pad token the eos id pads, which is harmless because padding never carries loss.
    """

    def __init__(self, path, eos: str | int | None = None, pad: str | int | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        self._tokenizer = Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._special_id("eos", eos, _EOS_CANDIDATES)
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

    def encode(self, text: str) -> list[int]:
        """Plain encoding: no bos/eos are added here, the datasets decide where eos goes."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def build_tokenizer(spec=None):
    """``None`` or ``"byte"`` -> :class:`ByteTokenizer`; a ``tokenizer.json`` path, or a directory holding
    one (e.g. a Hugging Face model directory) -> :class:`HFTokenizer`."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    return HFTokenizer(path / "tokenizer.json" if path.is_dir() else path)
