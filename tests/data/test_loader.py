from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from lmforge.data.errors import DataError
from lmforge.data.loader import BatchLoader, TokenDataset, val_batches

SEQ_LEN = 16


def split_stream(data_dir, manifest, split) -> np.ndarray:
    files = [s["file"] for s in manifest["shards"] if s["split"] == split]
    return np.concatenate([np.fromfile(data_dir / f, dtype=manifest["dtype"]) for f in files]).astype(
        np.int64
    )


def all_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """(n_windows, seq_len + 1): windows at stride seq_len."""
    n = (len(stream) - 1) // seq_len
    return np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len][:n]


def rows(batch) -> list[bytes]:
    inputs, targets = batch
    windows = torch.cat([inputs, targets[:, -1:]], dim=1).numpy()  # (B, T+1)
    return [w.tobytes() for w in windows]


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_dataset_windows_match_stream_across_shards(small_prepared):
    out, manifest = small_prepared
    ds = TokenDataset(out, "train")
    stream = split_stream(out, manifest, "train")
    assert ds.n_tokens == len(stream) == manifest["counts"]["tokens"]["train"]
    assert ds.n_windows(SEQ_LEN) == (len(stream) - 1) // SEQ_LEN
    # 5000-token shards: window 312 holds tokens 4992..5008, across the first shard boundary
    for index in (0, 312, ds.n_windows(SEQ_LEN) - 1):
        expected = stream[index * SEQ_LEN : index * SEQ_LEN + SEQ_LEN + 1]
        assert np.array_equal(ds.window(index, SEQ_LEN), expected)
    assert np.array_equal(ds.tokens(4990, 10010), stream[4990:10010])  # three shards
    with pytest.raises(DataError, match="split"):
        TokenDataset(out, "test")


def test_batches_are_shifted_windows_covering_an_epoch(small_prepared):
    out, manifest = small_prepared
    windows = all_windows(split_stream(out, manifest, "train"), SEQ_LEN)
    loader = BatchLoader(out, "train", batch_size=4, seq_len=SEQ_LEN, seed=0)
    assert loader.n_windows == len(windows)
    seen = Counter()
    for _ in range(len(windows) // 4):  # one epoch, less the last partial batch
        inputs, targets = batch = loader.next_batch()
        assert inputs.shape == targets.shape == (4, SEQ_LEN)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        seen.update(rows(batch))
    # every row is a window of the stream, and no window repeats within an epoch
    assert not seen - Counter(w.tobytes() for w in windows)
    assert sum(seen.values()) == len(windows) // 4 * 4
    assert loader.epoch == 0


def test_same_seed_same_batches_other_seed_differs(small_prepared):
    out, _ = small_prepared
    a = take(BatchLoader(out, "train", 4, SEQ_LEN, seed=1), 5)
    b = take(BatchLoader(out, "train", 4, SEQ_LEN, seed=1), 5)
    c = take(BatchLoader(out, "train", 4, SEQ_LEN, seed=2), 5)
    assert_same(a, b)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c, strict=True))


def test_epochs_are_reshuffled_and_stream_crosses_them(small_prepared):
    out, _ = small_prepared
    loader = BatchLoader(out, "train", 7, SEQ_LEN, seed=0)
    n = loader.n_windows
    epoch0 = [r for b in take(loader, -(-2 * n // 7)) for r in rows(b)]  # a bit over two epochs
    first, second = epoch0[:n], epoch0[n : 2 * n]
    assert Counter(first) == Counter(second)  # each epoch is a permutation of the same windows
    assert first != second  # ...in a different order
    assert loader.epoch == 2


def test_resume_from_state_dict(small_prepared):
    out, _ = small_prepared
    loader = BatchLoader(out, "train", 4, SEQ_LEN, seed=5)
    take(loader, 30)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    assert all(isinstance(v, int) for v in state.values())
    expected = take(loader, 40)  # crosses an epoch boundary
    resumed = BatchLoader(out, "train", 4, SEQ_LEN, seed=5)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 40), expected)
    with pytest.raises(DataError, match="seed"):
        BatchLoader(out, "train", 4, SEQ_LEN, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        BatchLoader(out, "train", 4, SEQ_LEN * 2, seed=5).load_state_dict(state)


def test_world_size_two_equals_one_with_double_batch(small_prepared):
    out, _ = small_prepared
    single = take(BatchLoader(out, "train", 6, SEQ_LEN, seed=9), 60)  # > one epoch
    ranks = [BatchLoader(out, "train", 3, SEQ_LEN, seed=9, rank=r, world_size=2) for r in range(2)]
    for (inputs, targets), rank_batches in zip(
        single, zip(*(take(r, 60) for r in ranks), strict=True), strict=True
    ):
        assert torch.equal(inputs, torch.cat([b[0] for b in rank_batches]))
        assert torch.equal(targets, torch.cat([b[1] for b in rank_batches]))
    assert ranks[0].state_dict() == ranks[1].state_dict()  # global position, the same on every rank


def test_resume_with_different_world_size(small_prepared):
    out, _ = small_prepared
    loader = BatchLoader(out, "train", 4, SEQ_LEN, seed=3)
    take(loader, 7)
    state = loader.state_dict()
    expected = take(loader, 5)
    ranks = [BatchLoader(out, "train", 2, SEQ_LEN, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for (inputs, _), rank_batches in zip(
        expected, zip(*(take(r, 5) for r in ranks), strict=True), strict=True
    ):
        assert torch.equal(inputs, torch.cat([b[0] for b in rank_batches]))


def test_corpus_smaller_than_a_batch(small_prepared):
    out, manifest = small_prepared
    n_windows = (manifest["counts"]["tokens"]["train"] - 1) // SEQ_LEN
    BatchLoader(out, "train", n_windows, SEQ_LEN, seed=0).next_batch()  # exactly one batch: fine
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchLoader(out, "train", n_windows + 1, SEQ_LEN, seed=0)
    with pytest.raises(DataError, match="world_size 2"):
        BatchLoader(out, "train", n_windows // 2 + 1, SEQ_LEN, seed=0, world_size=2)
    with pytest.raises(DataError, match="rank 2"):
        BatchLoader(out, "train", 1, SEQ_LEN, seed=0, rank=2, world_size=2)


def test_val_batches_fixed_and_in_order(small_prepared):
    out, manifest = small_prepared
    windows = all_windows(split_stream(out, manifest, "val"), SEQ_LEN)
    batches = val_batches(out, 4, SEQ_LEN, max_batches=3)
    assert len(batches) == 3
    assert_same(batches, val_batches(out, 4, SEQ_LEN, max_batches=3))
    for k, batch in enumerate(batches):
        assert rows(batch) == [w.tobytes() for w in windows[4 * k : 4 * k + 4]]
        assert torch.equal(batch[0][:, 1:], batch[1][:, :-1])
    everything = val_batches(out, 4, SEQ_LEN, max_batches=10_000)
    assert len(everything) == len(windows) // 4  # only full batches
    tiny = val_batches(out, len(windows) + 5, SEQ_LEN, max_batches=2)  # val smaller than a batch
    assert len(tiny) == 1 and tiny[0][0].shape == (len(windows), SEQ_LEN)
