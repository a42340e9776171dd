"""Prepare a corpus for training: tokenizer + memory-mappable token shards + manifest.

Output directory::

    tokenizer.json          Hugging Face tokenizers format
    train_000.bin, ...      raw token ids (no header), dtype from the manifest, each document + eos
    val_000.bin, ...
    manifest.json           metadata, written LAST: its presence means the shards are complete

Crash safety: an old manifest is removed before anything else is written, shards are written under
``*.tmp`` names and renamed when complete, and the manifest is written to a temp file and renamed
into place. A directory with a manifest therefore always holds the complete shards it lists.

Train/val split is by document: a document goes to val when a hash of (seed, origin) falls below
``val_fraction``, so the split does not depend on corpus order or on the number of workers. With
two or more documents (and ``val_fraction > 0``) each split gets at least one document.

Tokenization runs in ``num_workers`` worker processes, each loading the tokenizer from its JSON
file and encoding ~1 MB batches of documents; batches come back in submission order, so the output
is byte-identical whatever ``num_workers`` is.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.errors import DataError
from lmforge.data.sources import iter_documents
from lmforge.data.tokenizer import (
    load_tokenizer,
    save_tokenizer,
    special_ids,
    tokenizer_sha256,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

FORMAT = "lmforge-tokens"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard

_SHARD_NAME = re.compile(r"^(train|val)_\d{3,}\.bin$")
_TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"
_BATCH_CHARS = 1 << 20  # text per worker task: large enough to amortise IPC, small enough to balance
# Tokenizer training counts every distinct pre-token; past ~1 GB of text more text barely changes the
# merges but costs time, so training stops reading there.
_TOKENIZER_TRAIN_CHARS = 1 << 30
_REQUIRED_KEYS = (
    "format",
    "format_version",
    "dtype",
    "vocab_size",
    "special_ids",
    "tokenizer_sha256",
    "counts",
    "shards",
)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare_data(
    source: str,
    out_dir: str | Path,
    vocab_size: int = 8192,
    val_fraction: float = 0.005,
    seed: int = 1337,
    num_workers: int | None = None,
    tokenizer_path: str | Path | None = None,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict[str, Any]:
    """Tokenize ``source`` (see :mod:`lmforge.data.sources`) into ``out_dir``; return the manifest.

    Trains a byte-level BPE tokenizer of ``vocab_size`` on the corpus unless ``tokenizer_path`` is
    given. ``num_workers``: tokenizer processes (None: one per CPU; 0: in this process).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if num_workers is None:
        num_workers = _cpu_count()
    out_dir = Path(out_dir)
    # Fails now, before out_dir is touched, if the source does not exist.
    iter_documents(source, exclude=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # From here on out_dir is not a valid data dir until the new manifest lands.
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for stale in out_dir.glob("*.tmp"):
        stale.unlink()

    with contextlib.ExitStack() as cleanup:
        # Workers start (fork) first, before tokenizer training starts HF's threads in this process.
        pool = cleanup.enter_context(_worker_pool(num_workers)) if num_workers > 0 else None
        tok_file = out_dir / TOKENIZER_FILE
        t_tokenizer = time.perf_counter()
        tok = _write_tokenizer(source, tok_file, vocab_size, tokenizer_path)
        tokenizer_s = time.perf_counter() - t_tokenizer
        ids = special_ids(tok)
        dtype = token_dtype(tok.get_vocab_size())

        t0 = time.perf_counter()
        skipped: list[str] = []
        documents = iter_documents(source, skipped=skipped, exclude=out_dir)
        encoder = _Encoder(tok_file, ids["eos"], dtype)
        batches = cleanup.enter_context(
            contextlib.closing(_encode_batches(documents, encoder, pool, num_workers))
        )
        writers = {split: _ShardWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}
        for writer in writers.values():
            cleanup.callback(writer.abort)  # no-op after close(); removes a partial shard on an error
        splitter = _Splitter(writers, seed, val_fraction)
        for origins, (tokens, lengths) in batches:  # tokens: (sum(lengths),), each document + eos
            ends = np.cumsum(lengths)
            for origin, start, end in zip(origins, ends - lengths, ends, strict=True):
                splitter.add(origin, tokens[start:end])
        splitter.finish()
        shards = [record for split in SPLITS for record in writers[split].close()]

    n_documents = dict(splitter.n_documents)
    n_tokens = {split: writers[split].n_tokens for split in SPLITS}
    counts = {"documents": n_documents, "tokens": n_tokens, "skipped_files": len(skipped)}
    tokenize_s = time.perf_counter() - t0
    logger.info(
        "tokenized %d documents into %d train + %d val tokens in %.1f s (%d workers)",
        sum(n_documents.values()),
        n_tokens["train"],
        n_tokens["val"],
        tokenize_s,
        num_workers,
    )
    keep = {record["file"] for record in shards}
    for path in out_dir.iterdir():
        if _SHARD_NAME.match(path.name) and path.name not in keep:
            path.unlink()  # a shard of an earlier, larger preparation
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.get_vocab_size(),  # can be below the requested size on a small corpus
        "requested_vocab_size": None if tokenizer_path is not None else vocab_size,
        "special_ids": ids,
        "tokenizer_file": TOKENIZER_FILE,
        "tokenizer_sha256": tokenizer_sha256(tok_file),
        "source": source,
        "seed": seed,
        "val_fraction": val_fraction,
        "counts": counts,
        "skipped_sample": skipped[:100],  # counts.skipped_files is complete; this is the first 100
        # Wall time on this machine: the quickstart's breakdown reads it.
        "seconds": {"tokenizer": round(tokenizer_s, 3), "tokenize": round(tokenize_s, 3)},
        "shards": shards,
    }
    _write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return manifest


def _write_tokenizer(
    source: str, tok_file: Path, vocab_size: int, tokenizer_path: str | Path | None
) -> Tokenizer:
    """Train a tokenizer on ``source`` (or load ``tokenizer_path``) and write it to ``tok_file``."""
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        if Path(tokenizer_path).resolve() != tok_file.resolve():
            _replace_with_copy(Path(tokenizer_path), tok_file)  # a copy: the same bytes, the same sha256
        return tok
    t0 = time.perf_counter()
    # The tokenizing pass reports skipped files; this pass stays quiet.
    documents = iter_documents(source, warn=False, exclude=tok_file.parent)
    tok = train_tokenizer(_take_chars(documents, _TOKENIZER_TRAIN_CHARS), vocab_size)
    tmp = tok_file.with_name(tok_file.name + ".tmp")
    save_tokenizer(tok, tmp)
    os.replace(tmp, tok_file)
    logger.info("trained tokenizer (vocab %d) in %.1f s", tok.get_vocab_size(), time.perf_counter() - t0)
    return tok


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _take_chars(documents: Iterable[tuple[str, str]], max_chars: int) -> Iterator[str]:
    n_chars = 0
    for _, text in documents:
        yield text
        n_chars += len(text)
        if n_chars >= max_chars:
            return


def _replace_with_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Tokenizing: ~1 MB batches of documents, encoded in worker processes, returned in order


class _Encoder:
    """Encodes a list of texts into one flat array: doc0 + eos, doc1 + eos, ... and their lengths.

    Pickled to the workers as (path, eos, dtype); each worker loads the tokenizer from the path once.
    """

    def __init__(self, tokenizer_path: Path, eos_id: int, dtype: np.dtype):
        self.tokenizer_path = tokenizer_path
        self.eos_id = eos_id
        self.dtype = dtype
        self._tok: Tokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    def _encode_batch(self, texts: list[str]):
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_path)
            # Text that happens to contain "<|eos|>" stays text: only our appended eos marks a boundary.
            self._tok.encode_special_tokens = True
        # encode_batch_fast skips the offsets we do not need (~1.5x faster); older tokenizers lack it.
        encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return encode_batch(texts, add_special_tokens=False)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        id_lists = [enc.ids for enc in self._encode_batch(texts)]
        lengths = np.fromiter((len(ids) + 1 for ids in id_lists), dtype=np.int64, count=len(id_lists))
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        start = 0
        for ids, length in zip(id_lists, lengths.tolist(), strict=True):
            tokens[start : start + length - 1] = ids
            tokens[start + length - 1] = self.eos_id
            start += length
        return tokens, lengths


_worker_encoder: _Encoder | None = None  # one per worker process: its tokenizer is loaded once


def _encode_in_worker(encoder: _Encoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    global _worker_encoder
    if _worker_encoder is None:
        _worker_encoder = encoder
    return _worker_encoder(texts)


def _init_worker() -> None:
    # One process per core already; HF's own thread pool on top would oversubscribe the cores.
    os.environ[_TOKENIZERS_PARALLELISM] = "false"


@contextlib.contextmanager
def _worker_pool(num_workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers are started on entry; shut down (pending work cancelled) on exit."""
    parallelism = os.environ.get(_TOKENIZERS_PARALLELISM)
    # A forked child must not use a Rust thread pool of ours (its threads do not survive the fork);
    # with the variable set HF also skips its "process just got forked" warning.
    os.environ[_TOKENIZERS_PARALLELISM] = "false"
    try:
        pool = ProcessPoolExecutor(
            max_workers=num_workers, mp_context=_pool_context(), initializer=_init_worker
        )
        pool.submit(int).result()  # with fork, every worker starts at the first task: now
    finally:
        if parallelism is None:
            del os.environ[_TOKENIZERS_PARALLELISM]
        else:
            os.environ[_TOKENIZERS_PARALLELISM] = parallelism
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork on Linux, spawn elsewhere (fork is unsafe on macOS).

    fork, because spawn re-imports the caller's main module in every worker: a script without an
    ``if __name__ == "__main__":`` guard would run prepare_data again in each worker. The pool is
    started before tokenizer training, while this process has no tokenizer threads, and the workers
    only run numpy and a tokenizer they load themselves.
    """
    if sys.platform == "linux":
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _batched(documents: Iterable[tuple[str, str]], max_chars: int) -> Iterator[tuple[list[str], list[str]]]:
    origins: list[str] = []
    texts: list[str] = []
    n_chars = 0
    for origin, text in documents:
        origins.append(origin)
        texts.append(text)
        n_chars += len(text)
        if n_chars >= max_chars:
            yield origins, texts
            origins, texts, n_chars = [], [], 0
    if texts:
        yield origins, texts


def _encode_batches(
    documents: Iterable[tuple[str, str]],
    encoder: _Encoder,
    pool: ProcessPoolExecutor | None,
    num_workers: int,
) -> Generator[tuple[list[str], tuple[np.ndarray, np.ndarray]], None, None]:
    """Yield ``(origins, (tokens, lengths))`` per batch, in corpus order."""
    batches = _batched(documents, _BATCH_CHARS)
    first = next(batches, None)
    second = next(batches, None)
    if pool is None or second is None:
        # In this process (HF threads still parallelise encode_batch); for one batch IPC costs more.
        for batch in itertools.chain([first, second], batches):
            if batch is not None:
                yield batch[0], encoder(batch[1])
        return
    assert first is not None  # a second batch implies a first
    pending: deque[tuple[list[str], Future]] = deque()
    for origins, texts in itertools.chain([first, second], batches):
        pending.append((origins, pool.submit(_encode_in_worker, encoder, texts)))
        if len(pending) >= 2 * num_workers:  # bounded: memory stays ~2 batches per worker
            origins, future = pending.popleft()
            yield origins, future.result()
    while pending:
        origins, future = pending.popleft()
        yield origins, future.result()


# ---------------------------------------------------------------------------------------------
# Train/val split by document, and shard writing


def _val_score(seed: int, origin: str) -> float:
    """A uniform number in [0, 1) from (seed, origin): the document goes to val if below val_fraction."""
    digest = hashlib.blake2b(f"{seed}\0{origin}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class _Splitter:
    """Routes documents to the train/val shard writers.

    While one split has no document yet, the other split holds back its document most like the
    empty split's (lowest score for train, highest for val) instead of writing it; at the end, if a
    split is still empty and there are >= 2 documents, the held document moves there. So with >= 2
    documents each split has at least one, and in the common case nothing is held for long.
    """

    def __init__(self, writers: dict[str, _ShardWriter], seed: int, val_fraction: float):
        self.writers = writers
        self.seed = seed
        self.val_fraction = val_fraction
        self.n_documents = {split: 0 for split in SPLITS}
        self.held: dict[str, tuple[float, np.ndarray] | None] = {split: None for split in SPLITS}

    def add(self, origin: str, tokens: np.ndarray) -> None:
        score = _val_score(self.seed, origin)
        split = "val" if score < self.val_fraction else "train"
        other = "train" if split == "val" else "val"
        self.n_documents[split] += 1
        held_other = self.held[other]
        if held_other is not None:  # the other split is no longer waiting for a document
            self.writers[other].write(held_other[1])
            self.held[other] = None
        to_write: np.ndarray | None = tokens
        if self.n_documents[other] == 0 and self.val_fraction > 0:
            key = score if split == "train" else -score  # smaller key: closer to the other split
            held = self.held[split]
            if held is None or key < held[0]:
                self.held[split] = (key, tokens.copy())  # copy: `tokens` is a view of a whole batch
                to_write = held[1] if held is not None else None
        if to_write is not None:
            self.writers[split].write(to_write)

    def finish(self) -> None:
        total = sum(self.n_documents.values())
        for split, other in (("train", "val"), ("val", "train")):
            held = self.held[split]
            if held is None:
                continue
            self.held[split] = None
            # A lone document goes to train: a run can do without val, not without train.
            target = other if self.n_documents[other] == 0 and (total >= 2 or split == "val") else split
            self.n_documents[split] -= 1
            self.n_documents[target] += 1
            self.writers[target].write(held[1])


class _ShardWriter:
    """Appends tokens to ``{split}_000.bin``, ``{split}_001.bin``, ... of at most ``shard_tokens`` each.

    A shard is written as ``*.bin.tmp``, fsynced, then renamed; its sha256 is computed on the way.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir = out_dir
        self.split = split
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.n_tokens = 0
        self.records: list[dict[str, Any]] = []
        self._file: BinaryIO | None = None  # the open *.bin.tmp shard, if any
        self._hash = hashlib.sha256()  # of the open shard; replaced when a shard is opened
        self._shard_n_tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        assert tokens.dtype == self.dtype
        while len(tokens) > 0:
            if self._file is None:
                name = f"{self.split}_{len(self.records):03d}.bin"
                self._file = open(self.out_dir / f"{name}.tmp", "wb")  # noqa: SIM115 (spans calls; closed in _finish_shard)
                self._hash = hashlib.sha256()
                self._shard_n_tokens = 0
            room = self.shard_tokens - self._shard_n_tokens
            chunk, tokens = tokens[:room], tokens[room:]
            data = chunk.tobytes()  # native little-endian on every platform we run on
            self._file.write(data)
            self._hash.update(data)
            self._shard_n_tokens += len(chunk)
            self.n_tokens += len(chunk)
            if self._shard_n_tokens == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._file is not None  # called by write() with a shard open
        name = f"{self.split}_{len(self.records):03d}.bin"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.out_dir / f"{name}.tmp", self.out_dir / name)
        self.records.append(
            {
                "file": name,
                "split": self.split,
                "n_tokens": self._shard_n_tokens,
                "sha256": self._hash.hexdigest(),
            }
        )
        self._file = None

    def abort(self) -> None:
        """Drop the shard being written (after an error); completed shards stay, unreferenced."""
        if self._file is not None:
            self._file.close()
            (self.out_dir / f"{self.split}_{len(self.records):03d}.bin.tmp").unlink(missing_ok=True)
            self._file = None

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish_shard()
        return self.records


# ---------------------------------------------------------------------------------------------
# Reading back


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read ``data_dir/manifest.json`` and check it against the shard files (existence and sizes).

    DataError for a missing or malformed manifest, a missing shard, or a shard whose size is not
    ``n_tokens * itemsize`` (a truncated or foreign file). Checksums: :func:`verify_shards`.
    """
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        if not data_dir.is_dir():
            raise DataError(f"data directory {data_dir} does not exist")
        raise DataError(f"{path} does not exist: prepare the data first (or a preparation did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not readable JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise DataError(f"{path} is not a JSON object")
    missing = [key for key in _REQUIRED_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{path} lacks key(s) {', '.join(missing)}")
    if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{path} has format {manifest['format']!r} version {manifest['format_version']!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path} has dtype {manifest['dtype']!r}, expected 'uint16' or 'uint32'")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    if not isinstance(manifest["shards"], list):
        raise DataError(f"{path}: 'shards' is not a list")
    split_tokens = {split: 0 for split in SPLITS}
    for i, shard in enumerate(manifest["shards"]):
        if not (
            isinstance(shard, dict)
            and isinstance(shard.get("file"), str)
            and _SHARD_NAME.match(shard["file"])  # a plain name: the manifest cannot point elsewhere
            and shard.get("split") in SPLITS
            and shard["file"].startswith(shard["split"] + "_")
            and isinstance(shard.get("n_tokens"), int)
            and shard["n_tokens"] > 0
            and isinstance(shard.get("sha256"), str)
        ):
            raise DataError(f"{path}: shards[{i}] is malformed: {json.dumps(shard)[:200]}")
        shard_path = data_dir / shard["file"]
        if not shard_path.is_file():
            raise DataError(f"shard {shard_path} is missing")
        size = shard_path.stat().st_size
        if size != shard["n_tokens"] * itemsize:
            raise DataError(
                f"shard {shard_path} has {size} bytes, manifest says {shard['n_tokens'] * itemsize}"
            )
        split_tokens[shard["split"]] += shard["n_tokens"]
    counted = manifest["counts"].get("tokens") if isinstance(manifest["counts"], dict) else None
    if counted != split_tokens:
        raise DataError(f"{path}: counts.tokens {counted} do not match the shards' total {split_tokens}")
    return manifest


def verify_shards(data_dir: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """Check every shard's (and the tokenizer's) sha256 against the manifest; reads all the data."""
    data_dir = Path(data_dir)
    if manifest is None:
        manifest = load_manifest(data_dir)
    for shard in manifest["shards"]:
        path = data_dir / shard["file"]
        if _sha256_file(path) != shard["sha256"]:
            raise DataError(f"shard {path} has a different sha256 than the manifest says (corrupted?)")
    tok_path = data_dir / manifest.get("tokenizer_file", TOKENIZER_FILE)
    if tokenizer_sha256(tok_path) != manifest["tokenizer_sha256"]:
        raise DataError(f"tokenizer {tok_path} has a different sha256 than the manifest says")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"cannot read shard {path}: {err.strerror}") from err
    return digest.hexdigest()
