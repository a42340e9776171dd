from __future__ import annotations

import json

import pytest

from lmforge.data.errors import DataError
from lmforge.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    padded_vocab_size,
    save_tokenizer,
    special_ids,
    tokenizer_sha256,
    train_tokenizer,
)

ROUND_TRIP_TEXTS = [
    "def f(x):\n\treturn x  # tab-indented\n",
    "    leading spaces and trailing spaces   ",
    "windows\r\nline\r\nendings\r\n",
    "unicode: naïve café Straße 日本語 Ελληνικά русский",
    "emoji 😀🚀👩‍👩‍👧 and combining e\u0301 and flags 🇫🇷",
    "chars never seen in training: ᚠᛇᚻ ⅷ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b \x00 \x7f",
    "text that looks special: <|eos|> <|bos|><|pad|>",
    "\n\n\n",
    " ",
    "x",
]


@pytest.fixture(scope="module")
def tok(docs_factory):
    return train_tokenizer(docs_factory(30), vocab_size=400)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_is_lossless(tok, text):
    # encode_special_tokens: special-token text in a document is plain text, as prepare encodes it
    tok.encode_special_tokens = True
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids, "a non-empty text has tokens"
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_bpe_compresses_and_reaches_vocab(tok, docs_factory):
    assert tok.get_vocab_size() == 400
    text = docs_factory(1, seed=99)[0]
    n_tokens = len(tok.encode(text).ids)
    assert n_tokens < len(text.encode("utf-8")) / 2  # merges learned: far fewer tokens than bytes


def test_special_ids(tok):
    ids = special_ids(tok)
    assert ids == {"bos": 0, "eos": 1, "pad": 2}
    assert [tok.id_to_token(ids[k]) for k in ("bos", "eos", "pad")] == list(SPECIAL_TOKENS)
    # a special token in the middle of text is still recognised when special tokens are not text
    tok.encode_special_tokens = False
    assert ids["eos"] in tok.encode("a<|eos|>b").ids


def test_special_ids_missing_raises():
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.BPE())
    with pytest.raises(DataError, match="<\\|bos\\|>"):
        special_ids(bare)


def test_vocab_too_small_raises():
    with pytest.raises(DataError, match="vocab_size 100"):
        train_tokenizer(["abc"], vocab_size=100)


def test_save_load_sha(tok, tmp_path, docs_factory):
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(tok, path)
    loaded = load_tokenizer(path)
    text = ROUND_TRIP_TEXTS[4]
    assert loaded.encode(text).ids == tok.encode(text).ids
    digest = tokenizer_sha256(path)
    assert len(digest) == 64 and digest == tokenizer_sha256(path)
    save_tokenizer(train_tokenizer(docs_factory(5, seed=7), 300), tmp_path / "other.json")
    assert tokenizer_sha256(tmp_path / "other.json") != digest


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(DataError, match="garbage.json"):
        load_tokenizer(tmp_path / "garbage.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="other.json"):
        load_tokenizer(tmp_path / "other.json")


@pytest.mark.parametrize(
    ("vocab", "multiple", "expected"),
    [(8192, 64, 8192), (8193, 64, 8256), (50257, 64, 50304), (1, 64, 64), (259, 128, 384), (400, 1, 400)],
)
def test_padded_vocab_size(vocab, multiple, expected):
    assert padded_vocab_size(vocab, multiple) == expected
