"""One tenant's training data: a JSONL file turned into fixed-length causal-LM arrays.

Each line is one sample in one of four formats:

* ``{"text": ...}``                         loss on every token;
* ``{"prompt": ..., "completion": ...}``    loss on the completion only;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``  a conversation in the base model's chat template
  (data/chat.py), loss on the assistant turns, ids as transformers' ``apply_chat_template`` gives them;
* ``{"input_ids": [...], "loss_mask": [...]}`` pre-tokenized, as RL frameworks hand it over
  (``loss_mask`` optional, all ones by default).

Any of them may carry ``"loss_weights"``: each loss token's weight in the tenant's objective (a number for every
loss token of the sample, or with ``input_ids`` one number per id; any sign, e.g. an RL advantage; ignored where
the mask is 0). The tenant's objective in a step is the weighted sum of its loss tokens' negative log-likelihoods
over N, the count of its loss tokens in the whole global batch (weight 0 included), so its gradient is
``-sum_t w_t grad log p(x_t) / N``: the policy gradient when w_t is the advantage and the samples come from the
adapter as it is at that step (no importance ratio, clipping or KL term). The logged ``lm loss`` stays the
unweighted mean NLL.

A Hugging Face tokenizer reads a sample as transformers does (its post-processor's bos first, if it has
one) and a prompt with its completion as one text, the completion's tokens being those that hold any of its
characters. eos is appended after text and completions (unless they end with it). A document's first token is
never a target (nothing before it in the document predicts it), so padding and packing put loss on exactly the
same tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A tenant data file cannot be used; the message names the file and, where it applies, the line."""


def load_jsonl(path, tokenizer) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Read and tokenize a tenant file into ``(ids, target_mask, target_weights)``, one per sample.

    ``target_mask[j] == 1`` means token ``j`` is predicted with loss, with weight ``target_weights[j]`` (1 unless
    the sample says otherwise; 0 wherever the mask is). Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    samples = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line.rstrip(b"\r\n"))
            except json.JSONDecodeError as e:  # where in this line (the file's line number is ours)
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:
                raise DataError(f"{where}: invalid JSON ({e})") from None
            try:
                samples.append(_tokenize(record, tokenizer))
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
    if not samples:
        raise DataError(f"{path}: no samples (the file is empty)")
    return samples


# Keys a user may give meaning loss_weights: refused (ignored, every weight would silently be 1).
_NEAR_LOSS_WEIGHTS = ("loss_weight", "weights", "weight", "advantages", "advantage")


def _tokenize(record, tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    keys = {k for k in ("text", "prompt", "completion", "messages", "input_ids", "loss_mask") if k in record}
    near = next((k for k in _NEAR_LOSS_WEIGHTS if k in record), None)
    if near is not None and "loss_weights" not in record:  # (other keys, e.g. an id, are the user's own)
        raise ValueError(f"unknown key '{near}': per-token loss weights (advantages) are 'loss_weights'")
    if keys in ({"text"}, {"prompt", "completion"}):
        prompt, trained_text = (("", _string(record, "text")) if keys == {"text"} else
                                (_string(record, "prompt"), _string(record, "completion")))
        ids, trained = tokenizer.encode_split(prompt + trained_text, len(prompt))
        mask = [int(t) for t in trained]
        if not ids or ids[-1] != tokenizer.eos_id:
            ids, mask = ids + [tokenizer.eos_id], mask + [1]
    elif keys == {"messages"}:
        ids, trained = tokenizer.encode_chat(_messages(record), record.get("tools"), record.get("documents"))
        mask = [int(t) for t in trained]
    elif keys in ({"input_ids"}, {"input_ids", "loss_mask"}):
        ids = _int_list(record, "input_ids")
        bad = next((i for i in ids if not 0 <= i < tokenizer.vocab_size), None)
        if bad is not None:
            raise ValueError(f"input_ids contains {bad}, outside the vocabulary of {tokenizer.vocab_size}")
        mask = _int_list(record, "loss_mask") if "loss_mask" in keys else [1] * len(ids)
        if len(mask) != len(ids):
            raise ValueError(f"loss_mask has {len(mask)} entries but input_ids has {len(ids)}")
        if any(m not in (0, 1) for m in mask):
            raise ValueError("loss_mask entries must be 0 or 1")
    else:
        raise ValueError(
            f"unknown sample format (keys {sorted(record)}); expected 'text', 'prompt' + 'completion', "
            "'messages', or 'input_ids' with optional 'loss_mask'"
        )
    if len(ids) < 2:
        raise ValueError(f"sample has {len(ids)} token(s); at least 2 are needed to predict anything")
    mask[0] = 0
    mask = np.asarray(mask, dtype=np.float32)
    weights = _loss_weights(record, len(ids), per_token="input_ids" in keys) if "loss_weights" in record else 1.0
    return np.asarray(ids, dtype=np.int64), mask, (mask * weights).astype(np.float32)


def _loss_weights(record: dict, length: int, per_token: bool) -> float | np.ndarray:
    """A sample's loss_weights: one number, or (pre-tokenized samples) one per id; finite in float32."""
    value = record["loss_weights"]
    if isinstance(value, list) and per_token:
        if len(value) != length:
            raise ValueError(f"loss_weights has {len(value)} entries but input_ids has {length}")
        numbers = value
    elif isinstance(value, list):
        raise ValueError("'loss_weights' must be one number here (the weight of every loss token): per-token "
                         "weights need 'input_ids'")
    else:
        numbers = [value]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise ValueError("'loss_weights' must be " + ("a number or a list of numbers (one per input id)" if per_token
                                                      else "a number"))
    with np.errstate(over="ignore"):  # (said below)
        weights = np.array([v if abs(v) < 1e300 else math.inf for v in numbers], dtype=np.float32)
    if not np.isfinite(weights).all():
        bad = repr(numbers[int(np.flatnonzero(~np.isfinite(weights))[0])])
        raise ValueError(f"'loss_weights' holds {bad if len(bad) <= 20 else bad[:12] + '...'}, not a finite float32")
    return weights if isinstance(value, list) else weights[0]


def _messages(record: dict) -> list[dict]:
    """A conversation: a list of {"role": str, "content": str, ...} (other keys, e.g. tool calls, are the
    template's)."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
        if m.get("content") is not None or "tool_calls" not in m:  # (a tool call's content may be null)
            _string(m, "content", f"messages[{i}].content")
    # (keys set to null are dropped, as transformers drops them: e.g. OpenAI exports' "tool_calls": null)
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _string(record: dict, key: str, name: str | None = None) -> str:
    value, name = record.get(key), name or key
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"'{name}' is not valid Unicode (a lone surrogate at character {e.start})") from None
    return value


def _int_list(record: dict, key: str) -> list[int]:
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"'{key}' must be a list of integers")
    return list(value)


class TenantDataset:
    """A tenant's samples as fixed-length ``tokens`` / ``labels`` / ``loss_mask`` / ``loss_weights`` rows, held in
    memory.

    Padding (default): one sample per row, truncated to ``seq_length + 1`` ids, padded with ``pad_id``.
    Packing (``pack=True``): the tenant's samples are concatenated (eos between documents) and cut into
    windows that overlap by one id, so every token after the first is a label exactly once; the last
    window is padded. Attention is not reset at document boundaries, and a document may be cut between two
    windows (megatron's pretraining data without --reset-attention-mask: for plain text, not prompt /
    completion pairs). ``cut`` counts the samples truncated (padding) or cut between windows (packing);
    ``cut_without_loss`` those of them left with no token with loss (padding); ``prompted`` the packed samples
    with tokens without loss past their first.
    """

    def __init__(self, path, tokenizer, seq_length: int, *, pack: bool = False):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        samples = load_jsonl(path, tokenizer)
        self.path, self.packed = Path(path), pack
        self.seq_length = seq_length
        self.pad_id = tokenizer.pad_id
        self.num_documents = len(samples)
        width = seq_length + 1
        # Per id: [loss mask, loss weight] (as targets: both 0 at a document's first token and at padding).
        targets = [np.stack([mask, weights], axis=1) for _, mask, weights in samples]
        if pack:
            eos = tokenizer.eos_id
            # Text and completions already end with eos; pre-tokenized samples may not.
            ended = [(i, t) if i[-1] == eos else (np.append(i, eos), np.append(t, [[0, 0]], axis=0))
                     for (i, _, _), t in zip(samples, targets)]
            ids = np.concatenate([i for i, _ in ended])
            target = np.concatenate([t for _, t in ended]).astype(np.float32)
            rows = (len(ids) - 2) // seq_length + 1  # ceil((len - 1) / seq_length): labels are ids[1:]
            span = rows * seq_length + 1
            ids = np.concatenate([ids, np.full(span - len(ids), self.pad_id, dtype=np.int64)])
            target = np.concatenate([target, np.zeros((span - len(target), 2), dtype=np.float32)])
            index = np.arange(rows)[:, None] * seq_length + np.arange(width)
            self._ids, self._targets = ids[index], target[index]
            lengths = np.array([len(i) for i, _ in ended])
            ends = np.cumsum(lengths)  # window r holds ids [r * seq_length, (r + 1) * seq_length]
            self.cut = int(((ends - 2) // seq_length != (ends - lengths) // seq_length).sum())
            self.cut_without_loss = 0
            self.prompted = sum(not mask[1:].all() for _, mask, _ in samples)
        else:
            self._ids = np.full((len(samples), width), self.pad_id, dtype=np.int64)
            self._targets = np.zeros((len(samples), width, 2), dtype=np.float32)
            self.cut = self.cut_without_loss = self.prompted = 0
            for row, ((ids, mask, _), target) in enumerate(zip(samples, targets)):
                n = min(len(ids), width)
                self._ids[row, :n], self._targets[row, :n] = ids[:n], target[:n]
                if n < len(ids):
                    self.cut += 1
                    self.cut_without_loss += int(not mask[1:n].any())
        if not self._targets[:, 1:, 0].any():  # a tenant that could never take a step
            raise DataError(f"{path}: no sample has a token with loss within seq_length {seq_length} (every "
                            "loss_mask is 0, or every prompt fills the sequence)")

    def notes(self) -> list[str]:
        """What the log says about this file (once): the samples cut to fit, and packed samples with a prompt."""
        said = []
        if self.cut and self.packed:
            said.append(f"{self.path}: {self.cut} of {self.num_documents} samples are cut between two packed "
                        f"sequences of {self.seq_length} tokens (attention does not reach across them)")
        elif self.cut:
            lost = f", {self.cut_without_loss} of them left with no token with loss" if self.cut_without_loss else ""
            said.append(f"{self.path}: {self.cut} of {self.num_documents} samples are longer than seq_length "
                        f"{self.seq_length} and cut{lost}")
        if self.prompted:
            said.append(f"{self.path}: {self.prompted} of {self.num_documents} packed samples have a prompt (tokens "
                        "without loss): their completions attend to the samples packed before them too "
                        "(--pack-sequences is meant for plain text)")
        return said

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, targets = self._ids[i], self._targets[i, 1:]
        return {
            "tokens": torch.tensor(ids[:-1]),
            "labels": torch.tensor(ids[1:]),
            "loss_mask": torch.tensor(targets[:, 0]),
            "loss_weights": torch.tensor(targets[:, 1]),
        }
