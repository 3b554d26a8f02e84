import json
import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXT = [
    "Hello world! The year 2026 had 365 days; 1234567 is a number.",
    "Ünïcödé, 日本語のテキスト, emoji 🎉🚀, and tabs\tand\nnewlines\r\n",
    "def f(x):\n    return x ** 2  # code too\n",
]
_rng = random.Random(0)  # plus random words: enough distinct pairs for every merge
TEXT += [" ".join("".join(_rng.choices("abcdefghijklmnopqrstuvwxyz", k=_rng.randint(1, 9))) for _ in range(50))
         for _ in range(50)]
GPT2_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tokenizers", "gpt2.tiktoken")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(iter(TEXT), vocab_size=400)


def test_trained_vocab_has_requested_size(tok):
    assert tok.vocab_size == 400
    assert tok.bos_token_id == 400 - len(SPECIAL_TOKENS)  # specials take the last ids, <|bos|> first


def test_too_small_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="--vocab-size 100"):
        Tokenizer.train(iter(TEXT), vocab_size=100)


def test_too_little_text_for_the_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="--max-chars"):
        Tokenizer.train(iter(["ab ab ab"]), vocab_size=1000)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_roundtrip_any_bytes(tok, data):
    # byte-level BPE: every byte sequence is representable, even invalid UTF-8
    ids = tok.enc._encode_bytes(data)
    assert all(0 <= i < tok.vocab_size - len(SPECIAL_TOKENS) for i in ids)
    assert tok.enc.decode_bytes(ids) == data


def test_specials_are_single_ids_and_never_from_text(tok):
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(tok.vocab_size - len(SPECIAL_TOKENS), tok.vocab_size))
    # the same string inside a document is just text, not the special token
    assert tok.bos_token_id not in tok.encode("<|bos|> hi")
    assert tok.encode("hi", prepend="<|bos|>")[0] == tok.bos_token_id
    assert tok.decode([tok.bos_token_id]) == "<|bos|>"


def test_batch_encode_equals_single(tok):
    batch = tok.encode(TEXT[:3], prepend=tok.bos_token_id, num_threads=2)
    assert batch == [[tok.bos_token_id] + tok.encode(t) for t in TEXT[:3]]


def test_save_load_same_ids_plain_json(tok, tmp_path):
    path = tok.save(str(tmp_path))
    with open(path) as f:
        data = json.load(f)  # plain JSON, not a pickle
    assert data["special_tokens"][0] == "<|bos|>"
    loaded = Tokenizer.load(str(tmp_path))
    for t in TEXT[:3]:
        assert loaded.encode(t) == tok.encode(t)
    assert loaded.vocab_size == tok.vocab_size and loaded.bos_token_id == tok.bos_token_id


def test_load_missing_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="tok_train"):
        Tokenizer.load(str(tmp_path))


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,)
    assert (tb[:256] == 1).all() and (tb[tok.bos_token_id:] == 0).all()
    ids = tok.encode(TEXT[1])
    assert int(tb[ids].sum()) == len(TEXT[1].encode("utf-8"))  # bytes add up exactly


def test_digits_split_in_pairs(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567")]
    assert all(len(p) <= 2 for p in pieces)


@pytest.mark.skipif(not os.path.exists(GPT2_FILE), reason="shared/tokenizers/gpt2.tiktoken not present")
def test_reference_gpt2_from_local_file():
    from scripts.tok_eval import GPT2_PATTERN
    gpt2 = Tokenizer.from_tiktoken_file(GPT2_FILE, GPT2_PATTERN)
    assert gpt2.vocab_size == 50257
    assert gpt2.encode("Hello world") == [15496, 995]  # the well-known GPT-2 ids
