"""Fixtures of the data tests: a small varied corpus written to tmp_path, and its prepared directory."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = [
    "def", "return", "self", "import", "class", "lambda", "x", "y", "None", "True", "data", "token",
    "naïve", "café", "Straße", "日本語", "中文", "Ελληνικά", "русский", "😀", "🚀", "e\u0301", "tab\tbed",
    "<|eos|>", "<|bos|>", "0.5", "1e-3", "(", ")", ":", "{}", "[]", "==", "#", "'''", '"', "\\n",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", "  ", "\n", "\r\n", "\t", "\n    ", "\n\n"]


def make_documents(n_docs: int, seed: int = 0, words_per_doc: int = 200) -> list[str]:
    """``n_docs`` distinct documents of code-like multilingual text (CRLF, tabs, emoji, special-token text)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        n = rng.randint(words_per_doc // 2, words_per_doc * 3 // 2)
        parts = [f"# document {i}\n"]
        for _ in range(n):
            parts.append(rng.choice(WORDS))
            parts.append(rng.choice(SEPARATORS))
        docs.append("".join(parts))
    return docs


def write_corpus(root: Path, docs: list[str]) -> dict[str, str]:
    """Write ``docs`` as files under ``root`` (some in subfolders); return {relative path: text}."""
    files = {}
    for i, text in enumerate(docs):
        rel = f"part{i % 3}/doc_{i:03d}.txt" if i % 2 else f"doc_{i:03d}.txt"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))  # bytes: keep CRLF as written
        files[rel] = text
    return files


@pytest.fixture(scope="session")
def docs_factory():
    """``make_documents`` for tests (test modules cannot import conftest)."""
    return make_documents


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("small_corpus")
    return root, write_corpus(root, make_documents(40))


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory, small_corpus) -> tuple[Path, dict]:
    """The small corpus prepared with several train shards (so windows cross shard boundaries)."""
    from lmforge.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("small_prepared")
    manifest = prepare_data(
        str(small_corpus[0]), out, vocab_size=400, val_fraction=0.2, seed=3, num_workers=0, shard_tokens=5000
    )
    return out, manifest
