from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import prepare as prepare_module
from lmforge.data.errors import DataError, DataWarning
from lmforge.data.loader import val_batches
from lmforge.data.prepare import load_manifest, prepare_data, verify_shards
from lmforge.data.tokenizer import load_tokenizer, tokenizer_sha256


def read_split(data_dir: Path, manifest: dict, split: str) -> np.ndarray:
    files = [s["file"] for s in manifest["shards"] if s["split"] == split]
    parts = [np.fromfile(data_dir / f, dtype=manifest["dtype"]) for f in files]
    return np.concatenate(parts) if parts else np.empty(0, dtype=manifest["dtype"])


def decode_documents(data_dir: Path, manifest: dict, split: str) -> list[str]:
    """Split a split's token stream at eos and decode every document."""
    tokens = read_split(data_dir, manifest, split)
    eos = manifest["special_ids"]["eos"]
    if len(tokens) == 0:
        return []
    assert tokens[-1] == eos, "every document ends with eos"
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    tok = load_tokenizer(data_dir / "tokenizer.json")
    return [
        tok.decode(tokens[a:b].tolist(), skip_special_tokens=False) for a, b in zip(starts, ends, strict=True)
    ]


def test_manifest_matches_shards(small_prepared):
    out, manifest = small_prepared
    assert manifest == load_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 400
    assert manifest["tokenizer_sha256"] == tokenizer_sha256(out / "tokenizer.json")
    eos = manifest["special_ids"]["eos"]
    for split in ("train", "val"):
        shards = [s for s in manifest["shards"] if s["split"] == split]
        for shard in shards:
            data = (out / shard["file"]).read_bytes()
            assert len(data) == 2 * shard["n_tokens"]
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert all(s["n_tokens"] == 5000 for s in shards[:-1])  # shard_tokens=5000, last one partial
        assert [s["file"] for s in shards] == [f"{split}_{i:03d}.bin" for i in range(len(shards))]
        tokens = read_split(out, manifest, split)
        assert len(tokens) == manifest["counts"]["tokens"][split] > 0
        assert int((tokens == eos).sum()) == manifest["counts"]["documents"][split]
        assert tokens.max() < manifest["vocab_size"]
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) >= 3
    assert sum(manifest["counts"]["documents"].values()) == 40
    assert not list(out.glob("*.tmp"))
    verify_shards(out, manifest)


def test_shard_round_trip_recovers_documents(small_prepared, small_corpus):
    out, manifest = small_prepared
    originals = small_corpus[1]
    train = decode_documents(out, manifest, "train")
    val = decode_documents(out, manifest, "val")
    assert len(val) >= 1 and len(train) >= 1
    assert sorted(train + val) == sorted(originals.values())  # lossless, each document exactly once
    assert not set(train) & set(val)
    assert any("<|eos|>" in doc for doc in train + val)  # special-token text survives as text


def test_jsonl_corpus_round_trip(tmp_path, docs_factory):
    docs = docs_factory(12, seed=5)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    manifest = prepare_data(str(corpus), tmp_path / "out", vocab_size=300, val_fraction=0.3, num_workers=0)
    train = decode_documents(tmp_path / "out", manifest, "train")
    val = decode_documents(tmp_path / "out", manifest, "val")
    assert sorted(train + val) == sorted(docs) and val


def test_output_independent_of_workers_and_batching(tmp_path, small_prepared, small_corpus, monkeypatch):
    out, manifest = small_prepared
    monkeypatch.setattr(prepare_module, "_BATCH_CHARS", 2000)  # many batches: the process pool is used
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    other = prepare_data(
        str(small_corpus[0]), tmp_path / "w2", vocab_size=400, val_fraction=0.2, seed=3, num_workers=2
    )
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # set for the workers' start only, then restored
    assert other["tokenizer_sha256"] == manifest["tokenizer_sha256"]  # training is deterministic
    assert other["counts"] == manifest["counts"]
    assert [s["file"] for s in other["shards"]] == ["train_000.bin", "val_000.bin"]
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "w2", other, split), read_split(out, manifest, split))


def test_split_depends_on_seed(tmp_path, small_prepared, small_corpus):
    out, manifest = small_prepared
    tok = out / "tokenizer.json"
    other = prepare_data(
        str(small_corpus[0]), tmp_path / "s", val_fraction=0.2, seed=4, num_workers=0, tokenizer_path=tok
    )
    assert other["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    assert other["requested_vocab_size"] is None
    assert set(decode_documents(tmp_path / "s", other, "val")) != set(decode_documents(out, manifest, "val"))


def test_two_documents_give_one_val_one_train(tmp_path, docs_factory):
    corpus = tmp_path / "c"
    corpus.mkdir()
    docs = docs_factory(2)
    for i, doc in enumerate(docs):
        (corpus / f"{i}.txt").write_text(doc)
    manifest = prepare_data(str(corpus), tmp_path / "out", vocab_size=300, val_fraction=1e-9, num_workers=0)
    assert manifest["counts"]["documents"] == {"train": 1, "val": 1}
    manifest = prepare_data(
        str(corpus), tmp_path / "out", vocab_size=300, val_fraction=0.999999, num_workers=0
    )
    assert manifest["counts"]["documents"] == {"train": 1, "val": 1}
    # one document: train only, and no val shard
    manifest = prepare_data(
        str(corpus / "0.txt"), tmp_path / "one", vocab_size=300, val_fraction=0.5, num_workers=0
    )
    assert manifest["counts"]["documents"] == {"train": 1, "val": 0}
    assert [s["split"] for s in manifest["shards"]] == ["train"]
    with pytest.raises(DataError, match="val split"):
        val_batches(tmp_path / "one", 1, 8, 1)


@pytest.fixture
def prepared_copy(tmp_path, small_prepared) -> tuple[Path, dict]:
    out = tmp_path / "copy"
    shutil.copytree(small_prepared[0], out)
    return out, small_prepared[1]


def test_truncated_shard_detected(prepared_copy):
    out, manifest = prepared_copy
    shard = out / "train_001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(DataError, match=r"train_001.bin has 9994 bytes, manifest says 10000"):
        load_manifest(out)


def test_missing_shard_detected(prepared_copy):
    out, _ = prepared_copy
    (out / "val_000.bin").unlink()
    with pytest.raises(DataError, match="val_000.bin is missing"):
        load_manifest(out)


def test_flipped_byte_detected_by_verify(prepared_copy):
    out, manifest = prepared_copy
    data = bytearray((out / "train_000.bin").read_bytes())
    data[100] ^= 0xFF
    (out / "train_000.bin").write_bytes(bytes(data))
    load_manifest(out)  # sizes still match
    with pytest.raises(DataError, match="train_000.bin has a different sha256"):
        verify_shards(out)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text[: len(text) // 2], "not readable JSON"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "dtype"}), "lacks key"),
        (lambda text: text.replace('"train_000.bin"', '"../../etc/passwd"'), "malformed"),
        (lambda text: text.replace('"format_version": 1', '"format_version": 99'), "version 99"),
    ],
)
def test_bad_manifest_detected(prepared_copy, edit, message):
    out, _ = prepared_copy
    path = out / "manifest.json"
    path.write_text(edit(path.read_text()))
    with pytest.raises(DataError, match=message):
        load_manifest(out)


def test_missing_manifest_and_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(DataError, match="manifest.json does not exist"):
        load_manifest(tmp_path)


def test_failed_prepare_leaves_no_manifest(prepared_copy, tmp_path, docs_factory):
    """A preparation that dies half-way must not leave the old manifest next to new shards."""
    out, _ = prepared_copy
    corpus = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": d}) for d in docs_factory(5)] + ["{broken"]
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:6"):
        prepare_data(str(corpus), out, vocab_size=300, num_workers=0)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))  # the partial shard was removed
    with pytest.raises(DataError, match="manifest.json does not exist"):
        load_manifest(out)


def test_reprepare_removes_stale_shards(prepared_copy, small_corpus):
    out, manifest = prepared_copy
    assert (out / "train_002.bin").exists()
    new = prepare_data(str(small_corpus[0]), out, vocab_size=400, val_fraction=0.2, seed=3, num_workers=0)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000.bin", "val_000.bin"]
    assert load_manifest(out) == new
    assert new["counts"] == manifest["counts"]


def test_bad_arguments(tmp_path, small_corpus):
    with pytest.raises(DataError, match="does-not-exist"):
        prepare_data(str(tmp_path / "does-not-exist"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for a bad source
    with pytest.raises(DataError, match="val_fraction"):
        prepare_data(str(small_corpus[0]), tmp_path / "out", val_fraction=1.0)


def test_skipped_files_counted_and_warned_once(tmp_path, docs_factory):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i, doc in enumerate(docs_factory(3)):
        (corpus / f"{i}.txt").write_text(doc)
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.warns(DataWarning) as record:
        manifest = prepare_data(str(corpus), tmp_path / "out", vocab_size=300, num_workers=0)
    assert [str(w.message).count("image.png") for w in record] == [1]  # the training pass is quiet
    assert manifest["counts"]["skipped_files"] == 1 and manifest["skipped_sample"][0].endswith("image.png")
    assert sum(manifest["counts"]["documents"].values()) == 3


def test_output_dir_inside_corpus_is_not_read(tmp_path, docs_factory):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(docs_factory(6)):
        (corpus / f"{i}.txt").write_text(doc)
    first = prepare_data(str(corpus), corpus / "prepared", vocab_size=300, num_workers=0)
    again = prepare_data(str(corpus), corpus / "prepared", vocab_size=300, num_workers=0)
    assert again["counts"] == first["counts"] and again["counts"]["skipped_files"] == 0
    assert sum(first["counts"]["documents"].values()) == 6


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::lmforge.data.errors.DataWarning")  # a few stdlib files are not UTF-8
def test_prepare_stdlib(tmp_path):
    start = time.perf_counter()
    manifest = prepare_data("stdlib", tmp_path, vocab_size=8192)
    seconds = time.perf_counter() - start
    counts = manifest["counts"]
    print(f"stdlib prepared in {seconds:.1f} s: {counts}")
    assert manifest["vocab_size"] == 8192 and manifest["dtype"] == "uint16"
    assert counts["documents"]["train"] > 1000 and counts["documents"]["val"] >= 1
    assert 3_000_000 < counts["tokens"]["train"] < 30_000_000
    assert counts["tokens"]["val"] > 1000
    assert counts["skipped_files"] == len(manifest["skipped_sample"]) < 20
    assert load_manifest(tmp_path) == manifest
