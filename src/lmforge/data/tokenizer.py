"""Byte-level BPE tokenizer: train, save, load.

We use Hugging Face ``tokenizers`` (Rust, fast, a format every other tool reads) rather than our own
BPE. Byte-level pre-tokenization with no normalizer means any text round-trips losslessly:
text -> bytes -> ids -> bytes -> text, whitespace, CRLF and emoji included.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.data.errors import DataError

# Ids 0, 1, 2: the trainer adds special tokens first, in this order.
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
_SPECIAL_KEYS = ("bos", "eos", "pad")

# 256 byte symbols + the special tokens: a smaller vocabulary could not encode every text.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries (fewer if the corpus runs out of merges)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE}"
        )
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would change the text and break the lossless round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, seen in the corpus or not: no text is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer JSON file; DataError if it is missing, unreadable or not a tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read tokenizer file {path}: {err}") from err
    try:
        json.loads(text)  # a clearer message for non-JSON than the Rust parser gives
    except ValueError as err:
        raise DataError(f"tokenizer file {path} is not JSON: {err}") from err
    try:
        return Tokenizer.from_str(text)
    except Exception as err:  # the Rust side raises a bare Exception
        raise DataError(f"tokenizer file {path} is not a tokenizer JSON: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return lines[0] if lines else type(err).__name__


def tokenizer_sha256(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise DataError(f"cannot read tokenizer file {path}: {err.strerror}") from err


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """``{"bos": id, "eos": id, "pad": id}``; DataError if the tokenizer lacks one of them."""
    ids = {}
    for key, token in zip(_SPECIAL_KEYS, SPECIAL_TOKENS, strict=True):
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise DataError(f"tokenizer has no special token {token!r} (needs {', '.join(SPECIAL_TOKENS)})")
        ids[key] = token_id
    return ids


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round up to a multiple of ``multiple``: embedding/LM-head matmuls are faster on tensor cores."""
    if vocab_size < 1 or multiple < 1:
        raise DataError(
            f"padded_vocab_size needs positive sizes, got vocab_size={vocab_size}, multiple={multiple}"
        )
    return -(-vocab_size // multiple) * multiple
