"""Tokenizers, tenant datasets and the multi-tenant data source."""

import json

import pytest
import torch

from megatron_multilora.data.datasets import DataError, TenantDataset, load_jsonl
from megatron_multilora.data.source import PAD_SLOT, MultiAdapterDataSource
from megatron_multilora.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

TOK = ByteTokenizer()
EOS, PAD = TOK.eos_id, TOK.pad_id


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_specials():
    tok = build_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and isinstance(build_tokenizer("byte"), ByteTokenizer)
    ids = tok.encode("héllo")
    assert ids == list("héllo".encode()) and max(ids) < 256
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "héllo"
    assert len({tok.eos_id, tok.pad_id}) == 2 and tok.vocab_size > max(tok.eos_id, tok.pad_id)


def _save_word_tokenizer(path, specials):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", *specials])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(path))
    return vocab


def test_hf_tokenizer_discovers_specials_from_file_or_directory(tmp_path):
    vocab = _save_word_tokenizer(tmp_path / "tokenizer.json", ["</s>", "<pad>"])
    for spec in (tmp_path, tmp_path / "tokenizer.json"):
        tok = build_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (vocab["</s>"], vocab["<pad>"], len(vocab))
        ids = tok.encode("hello world")
        assert ids == [vocab["hello"], vocab["world"]]  # no special tokens added by encode
        assert tok.decode(ids + [tok.eos_id]) == "hello world"


def test_hf_tokenizer_explicit_eos_and_pad_fallback(tmp_path):
    vocab = _save_word_tokenizer(tmp_path / "tokenizer.json", ["<|im_end|>", "<|custom_end|>"])
    tok = HFTokenizer(tmp_path / "tokenizer.json", eos="<|custom_end|>")
    assert tok.eos_id == vocab["<|custom_end|>"] and tok.pad_id == tok.eos_id  # no pad token: eos pads
    assert HFTokenizer(tmp_path / "tokenizer.json", eos=2).eos_id == 2
    with pytest.raises(ValueError, match="no eos token found.*'<nope>'"):
        HFTokenizer(tmp_path / "tokenizer.json", eos="<nope>")


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_tokenizer(tmp_path / "missing.json")
    _save_word_tokenizer(tmp_path / "tokenizer.json", ["<weird>"])
    with pytest.raises(ValueError, match="no eos token found"):
        HFTokenizer(tmp_path / "tokenizer.json")


def _chat_bpe(path, *, template: str | None = "<s> $A"):
    """A byte-level BPE like GPT-2's / Llama-3's (trained here on a few lines, so " 4" is one token), with
    </s> and <|im_end|>, a chat role marker that eats the whitespace after it (rstrip, as Phi-3's), the
    post-processor `template`, and the truncation / padding a file may carry."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Answer: 4", "Answer: 4 4 4", "Question: what is 2+2? Answer: 4"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<|assistant|>", rstrip=True)])
    if template:
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 0), ("</s>", 1)])
    tok.enable_truncation(max_length=3)  # (stored in the file: transformers ignores them, so must we)
    tok.enable_padding(length=12, pad_id=1, pad_token="</s>")
    tok.save(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def test_hf_tokenizer_encodes_samples_as_transformers_does(tmp_path):
    """(It encoded prompt and completion apart -- a space or word piece split at the seam, so a completion
    learned to start with a stray token --, added no bos, kept a file's stored truncation and padding, and put a
    second eos after a text ending with one.)"""
    reference = _chat_bpe(tmp_path / "tokenizer.json")
    tok = build_tokenizer(tmp_path)
    whole = reference.encode("Question: what is 2+2? Answer: 4")
    assert whole.tokens[0] == "<s>" and "Ġ4" in whole.tokens and len(whole.ids) > 3  # (not cut, not padded)
    for prompt, completion in (("Question: what is 2+2? Answer:", " 4"), ("Question: what is 2+2? Answer: ", "4")):
        ids, mask, _ = load_jsonl(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}]),
                               tok)[0]
        assert ids.tolist() == whole.ids + [tok.eos_id]
        assert mask.tolist() == [0] * (len(whole.ids) - 1) + [1, 1]  # " 4" (one token, even across the seam), eos
    ids, mask, _ = load_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "Answer: 4</s>"}]), tok)[0]
    assert ids.tolist() == reference.encode("Answer: 4</s>").ids and ids[-1] == tok.eos_id  # one eos
    assert ids[0] == reference.token_to_id("<s>") and mask[0] == 0 and mask[1:].all()  # the first word is trained
    # text that begins with the bos already (a chat template's output) gets no second one
    ids, _, _ = load_jsonl(write_jsonl(tmp_path / "b.jsonl", [{"text": "<s>Answer: 4"}]), tok)[0]
    assert ids.tolist() == reference.encode("Answer: 4").ids + [tok.eos_id]
    # a role marker that takes the completion's leading newline stays the prompt's
    ids, mask, _ = load_jsonl(write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Question<|assistant|>",
                                                               "completion": "\n4"}]), tok)[0]
    marker = ids.tolist().index(reference.token_to_id("<|assistant|>"))
    assert mask[marker] == 0 and mask[marker + 1:].all()


def test_a_post_processor_that_adds_eos_ends_samples_with_one_trained_eos(tmp_path):
    """(Its eos came with no loss -- the adapter never learned to stop -- or a second eos followed it.)"""
    reference = _chat_bpe(tmp_path / "tokenizer.json", template="<s> $A </s>")
    tok = build_tokenizer(tmp_path)
    for record in ({"text": "Answer: 4"}, {"prompt": "Answer:", "completion": " 4"}):
        ids, mask, _ = load_jsonl(write_jsonl(tmp_path / "t.jsonl", [record]), tok)[0]
        assert ids.tolist() == reference.encode("Answer: 4").ids and ids.tolist().count(tok.eos_id) == 1
        assert ids[-1] == tok.eos_id and mask[-1] == 1


def test_the_eos_of_a_tokenizer_config_beside_the_file_is_the_models(tmp_path):
    """(The first of a fixed list was taken: a chat model ending turns with <|im_end|> learned to end with </s>.)"""
    reference = _chat_bpe(tmp_path / "tokenizer.json", template=False)
    assert build_tokenizer(tmp_path).eos_id == reference.token_to_id("</s>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    tok = build_tokenizer(tmp_path)
    assert tok.eos_id == reference.token_to_id("<|im_end|>") and "eos '<|im_end|>'" in tok.describe()
    ids, _, _ = load_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Answer:", "completion": " 4"}]), tok)[0]
    assert ids[-1] == tok.eos_id and ids[0] != reference.token_to_id("<s>")  # (no template: no bos)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not_there|>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json: eos_token '<|not_there|>' is not in the vocab"):
        build_tokenizer(tmp_path)


# ChatML-like, with transformers' generation tags around what the assistant says (its own mask follows them).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}"
    "{{ m['content'] }}{{ eos_token }}{% endgeneration %}\n{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question: what is 2+2?"},
                {"role": "assistant", "content": "Answer: 4"}, {"role": "user", "content": "And 4 4?"},
                {"role": "assistant", "content": "4 4"}]


def _chat_tokenizer(directory, template=CHAT_TEMPLATE, as_file=False):
    _chat_bpe(directory / "tokenizer.json")
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    if as_file:
        (directory / "chat_template.jinja").write_text(template)
        config["chat_template"] = "{{ raise_exception('the tokenizer_config.json one') }}"  # (the file wins)
    else:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return build_tokenizer(directory)


@pytest.mark.parametrize("as_file", [False, True])
def test_messages_are_encoded_as_transformers_apply_chat_template_does(tmp_path, as_file):
    """Ids as transformers' apply_chat_template(tokenize=True) gives them; loss on the tokens its assistant mask
    (from the template's generation tags) marks -- found here without the tags, from where the template's prompt for
    each assistant turn ends; the role marker that eats the newline after it stays the prompt's."""
    from transformers import PreTrainedTokenizerFast

    tok = _chat_tokenizer(tmp_path, as_file=as_file)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>")
    reference.chat_template = CHAT_TEMPLATE
    want = reference.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
    ids, mask, weights = load_jsonl(write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": CONVERSATION, "loss_weights": 0.5}]), tok)[0]
    assert ids.tolist() == want["input_ids"] and mask.tolist() == want["assistant_masks"]
    assert mask.sum() == 4 + 3 and ids[-1] == tok.eos_id and mask[-1] == 1  # Answer : Ġ4 </s>, 4 Ġ4 </s>
    assert weights.tolist() == (0.5 * mask).tolist()
    item = TenantDataset(tmp_path / "chat.jsonl", tok, seq_length=len(ids) + 3)[0]  # shifted to labels, padded
    assert item["labels"].tolist()[:len(ids) - 1] == ids[1:].tolist()
    assert item["loss_mask"].tolist() == mask[1:].tolist() + [0] * 4


def test_tools_and_null_keys_reach_the_template_as_transformers_passes_them(tmp_path):
    """A sample's top-level "tools" go to the template (it was rendered without them: tool calls trained with no
    schema in the prompt); keys set to null are dropped (OpenAI exports' "tool_calls": null)."""
    from transformers import PreTrainedTokenizerFast

    template = "{% if tools is not none %}Tools: {{ tools | tojson }}\n{% endif %}" + CHAT_TEMPLATE
    tok = _chat_tokenizer(tmp_path, template)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>")
    reference.chat_template = template
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    for record, kwargs in (({"messages": CONVERSATION, "tools": tools}, {"tools": tools}),
                           ({"messages": [dict(m, tool_calls=None) for m in CONVERSATION]}, {})):
        ids, _, _ = load_jsonl(write_jsonl(tmp_path / "chat.jsonl", [record]), tok)[0]
        assert ids.tolist() == reference.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                                             **kwargs)["input_ids"]


@pytest.mark.parametrize("messages, template, message", [
    ([{"role": "user", "content": "Answer: 4"}], CHAT_TEMPLATE, "'messages' has no assistant message with content"),
    ("hi", CHAT_TEMPLATE, "'messages' must be a non-empty list"),
    ([{"content": "x"}], CHAT_TEMPLATE, r"messages\[0\] must be an object with a string 'role'"),
    ([{"role": "user", "content": ["x"]}], CHAT_TEMPLATE, r"'messages\[0\]\.content' must be a string, got list"),
    (CONVERSATION, "{{ raise_exception('no system role') }}", "the chat template fails on these messages: no system"),
    # a template that renders earlier assistant turns differently once a later one exists (as some reasoning
    # models' drop their thinking): no one token sequence holds every turn as it was trained
    (CONVERSATION, "{% for m in messages %}{% if not loop.last %}{{ m['content'][:3] }}{% else %}{{ m['content'] }}"
                   "{% endif %}{% endfor %}", "the chat template does not render the conversation up to message 2 as the "
                                           "beginning"),
])
def test_bad_conversations_are_named(tmp_path, messages, template, message):
    tok = _chat_tokenizer(tmp_path, template)
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: " + message):
        load_jsonl(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tok)


def test_messages_without_a_chat_template_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match="the byte-level tokenizer has none"):
        load_jsonl(path, TOK)
    _chat_bpe(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match=f"chat template: none beside {tmp_path / 'tokenizer.json'}"):
        load_jsonl(path, build_tokenizer(tmp_path))


def test_a_string_the_tokenizer_cannot_take_is_named_with_its_line(tmp_path):
    _chat_bpe(tmp_path / "tokenizer.json")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "\\ud800"}\n')  # a lone surrogate (valid JSON escape)
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: 'text' is not valid Unicode \(a lone surrogate at "
                                        r"character 0\)"):
        load_jsonl(path, build_tokenizer(tmp_path))


# ---------------------------------------------------------------------------------------------- datasets


def test_text_sample_shifted_labels_and_padding_mask(tmp_path):
    ds = TenantDataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}]), TOK, seq_length=6)
    item = ds[0]
    ids = [*b"abc", EOS]
    assert item["tokens"].tolist() == ids + [PAD, PAD]
    assert item["labels"].tolist() == ids[1:] + [PAD, PAD, PAD]
    assert item["loss_mask"].tolist() == [1, 1, 1, 0, 0, 0]  # predicts b, c, eos; padding masked
    assert item["tokens"].dtype == item["labels"].dtype == torch.long
    assert item["loss_mask"].dtype == torch.float32


def test_prompt_tokens_masked_completion_and_eos_not(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "ab=", "completion": "ba"}])
    item = TenantDataset(path, TOK, seq_length=8)[0]
    labels, mask = item["labels"].tolist(), item["loss_mask"].tolist()
    counted = [label for label, m in zip(labels, mask) if m]
    assert counted == [*b"ba", EOS]
    assert mask == [0, 0, 1, 1, 1, 0, 0, 0]  # labels b, =, then b, a, eos, then padding


def test_pretokenized_with_and_without_mask(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}, {"input_ids": [9, 10, 11]}],
    )
    ds = TenantDataset(path, TOK, seq_length=4)
    assert ds[0]["tokens"].tolist() == [5, 6, 7, 8]
    assert ds[0]["labels"].tolist() == [6, 7, 8, PAD]  # no eos appended to pre-tokenized samples
    assert ds[0]["loss_mask"].tolist() == [0, 1, 1, 0]
    assert ds[1]["labels"].tolist() == [10, 11, PAD, PAD]
    assert ds[1]["loss_mask"].tolist() == [1, 1, 0, 0]


def test_truncation(tmp_path):
    item = TenantDataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "abcdefgh"}]), TOK, seq_length=4)[0]
    assert item["tokens"].tolist() == list(b"abcd")
    assert item["labels"].tolist() == list(b"bcde")
    assert item["loss_mask"].tolist() == [1, 1, 1, 1]


def test_cut_samples_are_counted(tmp_path):
    """(Samples whose completion seq_length cut away trained nothing, unsaid; the trainer names the counts.)"""
    records = [{"prompt": "x" * 12, "completion": "y"}, {"text": "abcdefghij"}, {"text": "ab"}]
    ds = TenantDataset(write_jsonl(tmp_path / "t.jsonl", records), TOK, seq_length=6)
    assert (ds.cut, ds.cut_without_loss) == (2, 1)
    assert ds.notes()[0].endswith("2 of 3 samples are longer than seq_length 6 and cut, 1 of them left with no "
                                   "token with loss")
    packed = TenantDataset(write_jsonl(tmp_path / "p.jsonl", [{"text": "abc"}, {"text": "defgh"}]), TOK,
                           seq_length=4, pack=True)  # ids abc. | defgh. : the second crosses a window edge
    assert (packed.cut, packed.cut_without_loss) == (1, 0)
    exact = TenantDataset(write_jsonl(tmp_path / "e.jsonl", [{"text": "abc"}, {"text": "de"}]), TOK, seq_length=3,
                          pack=True)  # abc. fills window 0 (4 ids), de. lies in window 1 ([3, 6]): none is cut
    assert exact.cut == 0


def test_packing_keeps_masks_and_separates_documents(tmp_path):
    records = [
        {"prompt": "xy", "completion": "z"},
        {"text": "abc"},
        {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    packed = TenantDataset(path, TOK, seq_length=5, pack=True)
    padded = TenantDataset(path, TOK, seq_length=16)
    # stream: x y z eos | a b c eos | 1 2 3 eos(separator, no loss) -> 12 ids, 11 labels -> 3 windows of 5
    assert len(packed) == 3 and padded.num_documents == packed.num_documents == 3
    tokens = torch.cat([packed[i]["tokens"] for i in range(len(packed))]).tolist()
    assert tokens[:12] == [*b"xyz", EOS, *b"abc", EOS, 1, 2, 3, EOS]
    assert tokens[12:] == [PAD] * 3
    labels = torch.cat([packed[i]["labels"] for i in range(len(packed))]).tolist()
    assert labels[:11] == tokens[1:12]  # windows overlap by one id: every id after the first is a label once

    def counted(ds):
        rows = [ds[i] for i in range(len(ds))]
        pairs = [(label, m) for r in rows for label, m in zip(r["labels"].tolist(), r["loss_mask"].tolist())]
        return sorted(label for label, m in pairs if m)

    # packing puts loss on exactly the tokens padding does: not on a document's first token, not on prompts
    assert counted(packed) == counted(padded) == sorted([*b"bc", EOS, *b"z", EOS, 2, 3])
    # (the prompt of the first sample is packed after nothing, but a user is told: packing is meant for text)
    assert packed.notes()[-1] == (f"{path}: 1 of 3 packed samples have a prompt (tokens without loss): their "
                                  "completions attend to the samples packed before them too (--pack-sequences is "
                                  "meant for plain text)")
    assert padded.notes() == []


def test_loss_weights_weigh_loss_tokens_only_and_follow_packing(tmp_path):
    """A sample's loss_weights (one number, or one per id) land on its labels like its mask (shifted by one),
    only on loss tokens; the mask (the tokens counted) does not change. Unweighted samples weigh 1."""
    records = [
        {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1], "loss_weights": [9.0, 9.0, -0.5, 2]},
        {"prompt": "a", "completion": "bc", "loss_weights": -1.5},
        {"text": "xy"},
    ]
    path = write_jsonl(tmp_path / "w.jsonl", records)
    ds = TenantDataset(path, TOK, seq_length=4)
    assert ds[0]["loss_mask"].tolist() == [0, 1, 1, 0] and ds[0]["loss_weights"].tolist() == [0, -0.5, 2, 0]
    assert ds[1]["loss_mask"].tolist() == [1, 1, 1, 0] and ds[1]["loss_weights"].tolist() == [-1.5] * 3 + [0]
    assert ds[2]["loss_weights"].tolist() == ds[2]["loss_mask"].tolist() == [1, 1, 0, 0]
    packed = TenantDataset(path, TOK, seq_length=5, pack=True)
    rows = [packed[i] for i in range(len(packed))]
    weights = {(r["labels"][j].item(), r["loss_weights"][j].item()) for r in rows for j in range(5)
               if r["loss_mask"][j]}
    assert weights == {(7, -0.5), (8, 2.0), (ord("b"), -1.5), (ord("c"), -1.5), (EOS, -1.5), (ord("y"), 1.0),
                       (EOS, 1.0)}
    assert sum(r["loss_mask"].sum().item() for r in rows) == 7  # the eos separator after [5..8] has no loss


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('{"prompt": "x=", "completion": "X"', r"invalid JSON \(Expecting ',' delimiter at column 35\)"),
        ('["text"]', "expected a JSON object"),
        ('{"content": "x"}', "unknown sample format"),
        ('{"text": "x", "prompt": "y"}', "unknown sample format"),
        ('{"prompt": "x"}', "unknown sample format"),
        ('{"text": 5}', "'text' must be a string"),
        ('{"prompt": "a", "completion": null}', "'completion' must be a string"),
        ('{"input_ids": [1, "2"]}', "'input_ids' must be a list of integers"),
        ('{"input_ids": [1, 2], "loss_mask": [1]}', "loss_mask has 1 entries but input_ids has 2"),
        ('{"input_ids": [1, 2], "loss_mask": [1, 2]}', "must be 0 or 1"),
        ('{"input_ids": [1, 999]}', "outside the vocabulary"),
        ('{"input_ids": [7]}', "at least 2"),
        ('{"input_ids": [1, 2], "loss_weights": [1]}', "loss_weights has 1 entries but input_ids has 2"),
        ('{"input_ids": [1, 2], "loss_weights": [1, NaN]}', "'loss_weights' holds nan, not a finite float32"),
        ('{"input_ids": [1, 2], "loss_weights": [1, 1e39]}', "holds 1e\\+39, not a finite float32"),  # (float32 inf)
        ('{"input_ids": [1, 2], "loss_weights": [1, 1' + '0' * 400 + ']}', "holds 100000000000\\.\\.\\., not a finite float32"),
        ('{"input_ids": [1, 2], "loss_weights": [1, true]}', "must be a number or a list of numbers"),
        ('{"input_ids": [1, 2], "loss_weights": "1"}', "must be a number or a list of numbers"),
        ('{"text": "ab", "loss_weights": [1, 2]}', "must be one number here .*per-token weights need 'input_ids'"),
        ('{"prompt": "a", "completion": "b", "loss_weights": Infinity}', "holds inf, not a finite float32"),
        ('{"prompt": "a", "completion": "b", "loss_weights": null}', "'loss_weights' must be a number$"),
        ('{"input_ids": [1, 2], "advantages": [0, 1]}', "unknown key 'advantages': .* are 'loss_weights'"),
        ('{"text": "ab", "loss_weight": 2}', "unknown key 'loss_weight'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", line])
    with pytest.raises(DataError, match=message) as err:
        TenantDataset(path, TOK, seq_length=8)
    assert f"{path}, line 3" in str(err.value)  # blank line 2 still counts


@pytest.mark.parametrize("pack", [False, True])
def test_a_file_without_any_loss_token_is_refused(tmp_path, pack):
    """Such a tenant could never take a step: all loss_mask 0, or every completion cut off by seq_length."""
    masked = write_jsonl(tmp_path / "masked.jsonl", [{"input_ids": [1, 2, 3], "loss_mask": [0, 0, 0]}] * 3)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 12, "completion": "y"}] * 3)
    for path in (masked, long):
        with pytest.raises(DataError, match=f"{path}: no sample has a token with loss within seq_length 8"):
            TenantDataset(path, TOK, seq_length=8, pack=pack and path == masked)
    TenantDataset(write_jsonl(tmp_path / "one.jsonl", [{"input_ids": [1, 2, 3], "loss_mask": [0, 0, 1]}]), TOK,
                  seq_length=8, pack=pack)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        TenantDataset(tmp_path / "nope.jsonl", TOK, seq_length=8)
    assert "nope.jsonl" in str(err.value)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no samples"):
        TenantDataset(tmp_path / "empty.jsonl", TOK, seq_length=8)


# ---------------------------------------------------------------------------------------------- data source

SEQ = 6


@pytest.fixture
def datasets(tmp_path):
    """name -> dataset whose sample i reads '<name><i>' (so decoded tokens identify the sample)."""

    def make(name, n):
        path = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name}{i:02d}"} for i in range(n)])
        return TenantDataset(path, TOK, seq_length=SEQ)

    return {"a": make("a", 7), "b": make("b", 5), "c": make("c", 11)}


def samples(plan):
    """(slot, sample text) of every real sample in this rank's micro-batches, in order."""
    out = []
    for mb in plan.micro_batches:
        for tokens, slot in zip(mb["tokens"], mb["slots"].tolist()):
            if slot != PAD_SLOT:
                out.append((slot, TOK.decode(tokens.tolist())))
    return out


SLOTS = {"a": 2, "b": 0, "c": 1}


def test_tenant_stream_independent_of_other_tenants(datasets):
    alone = MultiAdapterDataSource({"a": (datasets["a"], 3)}, seed=7, micro_batch_size=2)
    mixed = MultiAdapterDataSource({n: (ds, 3) for n, ds in datasets.items()}, seed=7, micro_batch_size=2)
    seq_alone = [s for _ in range(6) for s in samples(alone.next_iteration(SLOTS))]
    seq_mixed = [s for _ in range(6) for s in samples(mixed.next_iteration(SLOTS)) if s[0] == SLOTS["a"]]
    assert seq_alone == seq_mixed and len(seq_alone) == 18
    other_seed = MultiAdapterDataSource({"a": (datasets["a"], 3)}, seed=8, micro_batch_size=2)
    assert [s for _ in range(6) for s in samples(other_seed.next_iteration(SLOTS))] != seq_alone
    twin = MultiAdapterDataSource({"a": (datasets["a"], 7), "twin": (datasets["a"], 7)}, seed=7)
    first_epoch = samples(twin.next_iteration({"a": 0, "twin": 1}))
    assert [t for s, t in first_epoch if s == 0] != [t for s, t in first_epoch if s == 1]  # name in seed


def test_epochs_are_permutations_and_roll_over(datasets):
    source = MultiAdapterDataSource({"b": (datasets["b"], 2)}, seed=1)
    seen = [text for _ in range(5) for _, text in samples(source.next_iteration(SLOTS))]
    assert sorted(seen[:5]) == sorted(seen[5:]) == [f"b{i:02d}" for i in range(5)]
    assert seen[:5] != seen[5:]  # a new order each epoch (for this seed)
    state = source.tenant_state("b")
    assert (state["epoch"], state["position"], state["steps"]) == (2, 0, 5)


def test_max_epochs_exhausts_with_a_partial_last_batch(datasets):
    source = MultiAdapterDataSource(seed=0)
    source.add_tenant("b", datasets["b"], 4, max_epochs=2)
    source.add_tenant("a", datasets["a"], 1)
    counts, exhausted, steps_left = [], [], [source.steps_left("b")]
    for _ in range(4):
        plan = source.next_iteration(SLOTS)
        counts.append(plan.samples_per_tenant.get("b"))
        exhausted.append(plan.exhausted)
        steps_left.append(source.steps_left("b"))
    assert counts == [4, 4, 2, None]  # 10 samples = 2 epochs, then b is no longer planned
    assert exhausted == [[], [], ["b"], []]
    assert steps_left == [3, 2, 1, 0, 0] and source.steps_left("a") is None  # (a: no max_epochs, no end)
    assert not source.is_active("b") and source.is_active("a")
    assert plan.tenants == ["a"]


@pytest.mark.parametrize("dp, mbs", [(2, 2), (3, 2), (4, 3)])
def test_data_parallel_split_matches_global_plan(datasets, dp, mbs):
    tenants = {n: (ds, gbs) for (n, ds), gbs in zip(datasets.items(), (3, 4, 2))}
    reference = MultiAdapterDataSource(tenants, seed=3, micro_batch_size=1)
    ranks = [MultiAdapterDataSource(tenants, seed=3, micro_batch_size=mbs, data_parallel_size=dp,
                                    data_parallel_rank=r) for r in range(dp)]
    for _ in range(3):
        expected = samples(reference.next_iteration(SLOTS))
        plans = [rank.next_iteration(SLOTS) for rank in ranks]
        assert len({p.num_micro_batches for p in plans}) == 1  # every rank runs the same number
        assert all(mb["tokens"].shape == (mbs, SEQ) for p in plans for mb in p.micro_batches)
        union = [s for p in plans for s in samples(p)]
        assert union == expected  # same samples, same order: contiguous chunks of the slot-sorted list
        assert [slot for slot, _ in union] == sorted(slot for slot, _ in union)
        assert {p.iteration for p in plans} == {reference.iteration}
        assert plans[0].samples_per_tenant == {"b": 4, "c": 2, "a": 3}
        for p in plans:
            for mb in p.micro_batches:
                pad = mb["slots"] == PAD_SLOT
                assert mb["loss_mask"][pad].sum() == 0 and (mb["tokens"][pad] == PAD).all()
        real = [len(samples(p)) for p in plans]
        assert max(real) - min(real) <= 1  # padding spread evenly, not piled on the last rank


def test_state_dict_round_trip_gives_identical_plans(datasets):
    def build():
        return MultiAdapterDataSource({n: (ds, 3) for n, ds in datasets.items()}, seed=5, micro_batch_size=2,
                                      max_samples_per_iteration=6)

    source = build()
    for _ in range(4):
        source.next_iteration(SLOTS)
    state = json.loads(json.dumps(source.state_dict()))  # must be JSON-serialisable
    expected = [source.next_iteration(SLOTS) for _ in range(5)]
    resumed = build()
    resumed.load_state_dict(state)
    for plan in expected:
        again = resumed.next_iteration(SLOTS)
        assert (again.iteration, again.tenants) == (plan.iteration, plan.tenants)
        assert samples(again) == samples(plan)


def test_tenant_state_moves_to_another_run(datasets):
    first = MultiAdapterDataSource({"a": (datasets["a"], 3), "b": (datasets["b"], 2)}, seed=1)
    for _ in range(3):
        first.next_iteration(SLOTS)
    state = first.remove_tenant("a")
    assert first.tenants == ["b"]
    alone = MultiAdapterDataSource({"a": (datasets["a"], 3)}, seed=1)
    for _ in range(3):
        alone.next_iteration(SLOTS)
    expected = [text for _ in range(4) for _, text in samples(alone.next_iteration(SLOTS))]
    # a different run: another seed, other tenants, another slot
    other = MultiAdapterDataSource({"c": (datasets["c"], 1)}, seed=99)
    other.add_tenant("a", datasets["a"], 3, state=state)
    plans = [other.next_iteration({"a": 0, "c": 1}) for _ in range(4)]
    got = [text for plan in plans for slot, text in samples(plan) if slot == 0]
    assert got == expected and len(got) == 12


def test_capacity_is_fair_and_deterministic(datasets):
    tenants = {"a": (datasets["a"], 6), "b": (datasets["b"], 3), "c": (datasets["c"], 3)}
    source = MultiAdapterDataSource(tenants, max_samples_per_iteration=7)
    history = [source.next_iteration(SLOTS) for _ in range(9)]
    assert all(sum(p.samples_per_tenant.values()) <= 7 for p in history)
    assert [p.tenants for p in history[:4]] == [["a"], ["b", "c"], ["a"], ["b", "c"]]
    steps = {n: sum(n in p.tenants for p in history) for n in tenants}
    assert min(steps.values()) >= 4  # no tenant starves
    late = MultiAdapterDataSource(tenants, max_samples_per_iteration=7)
    for _ in range(9):
        late.next_iteration(SLOTS)
    late.add_tenant("d", datasets["b"], 7)  # a newcomer goes first, then everyone waits their turn
    assert [late.next_iteration(SLOTS | {"d": 3}).tenants for _ in range(3)] == [["d"], ["b", "c"], ["a"]]


def test_subset_and_no_tenants(datasets):
    source = MultiAdapterDataSource({n: (ds, 2) for n, ds in datasets.items()}, micro_batch_size=2)
    plan = source.next_iteration({"c": 4}, tenants=["c"])
    assert plan.tenants == ["c"] and samples(plan)[0][0] == 4
    empty = MultiAdapterDataSource(micro_batch_size=2).next_iteration({})
    assert (empty.tenants, empty.micro_batches, empty.num_micro_batches) == ([], [], 0)


def test_source_errors(datasets):
    source = MultiAdapterDataSource({"a": (datasets["a"], 2), "b": (datasets["b"], 2)})
    with pytest.raises(ValueError, match="'b' steps this iteration but has no slot"):
        source.next_iteration({"a": 0})
    with pytest.raises(ValueError, match="share a slot"):
        source.next_iteration({"a": 0, "b": 0})
    assert source.iteration == 0  # a rejected plan consumes nothing
    with pytest.raises(KeyError, match="unknown tenant 'z'"):
        source.next_iteration(SLOTS, tenants=["z"])
    with pytest.raises(ValueError, match="already in the data source"):
        source.add_tenant("a", datasets["a"], 1)
    with pytest.raises(ValueError, match="can never fit"):
        MultiAdapterDataSource({"a": (datasets["a"], 5)}, max_samples_per_iteration=4)
    with pytest.raises(DataError, match=r"now gives \d+; the data changed .*: restore the data, or train the new data"):
        source.add_tenant("c", datasets["c"], 1, state=source.tenant_state("a"))  # (a DataError: one line, exit 2)
    with pytest.raises(ValueError, match="not added to the data source"):
        MultiAdapterDataSource({"a": (datasets["a"], 2)}).load_state_dict(source.state_dict())


# ---------------------------------------------------------------------------------------------- demo data


def test_demo_data_is_deterministic_short_and_loadable(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "tools" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", script)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for out in ("one", "two"):
        tool.main(["--out", str(tmp_path / out), "--train-samples", "40", "--valid-samples", "5"])
    for name in ("reverse", "caps", "arith", "echo"):
        for split in ("train", "valid"):
            path = tmp_path / "one" / name / f"{split}.jsonl"
            assert path.read_text() == (tmp_path / "two" / name / f"{split}.jsonl").read_text()
            ds = TenantDataset(path, TOK, seq_length=64)
            assert all(ds[i]["tokens"][-1] == PAD for i in range(len(ds)))  # every sample fits in 64 bytes
    first = json.loads((tmp_path / "one" / "reverse" / "train.jsonl").read_text().splitlines()[0])
    assert first["completion"] == first["prompt"][:-1][::-1]
