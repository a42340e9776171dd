"""The loader's worker-side code called in this process: what a DataLoader worker computes for an item,
what travels to it, the shard checks, and the signals it ignores.

tests/data/test_loader_workers.py runs the same code in real worker processes, where a bug shows as a
wrong batch or a hang but a coverage tool (or mutmut, `make mutate`) cannot see it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.errors import DataError
from lmforge.data.loader import (
    BatchLoader,
    TokenDataset,
    _BatchOrder,
    _check_shard_files,
    _ignore_stop_signals,
    _RankBatches,
    _WorkerFailure,
)

SEQ_LEN = 16
SEED = 5


@pytest.fixture(scope="module")
def data_dir(small_prepared) -> Path:
    data = small_prepared[0]
    assert len(TokenDataset(data, "train").shard_paths) >= 3  # windows cross shard boundaries
    return data


@pytest.fixture
def data_copy(data_dir, tmp_path) -> Path:
    copy = tmp_path / "prepared"
    shutil.copytree(data_dir, copy)
    return copy


def rank_batches(data: Path, batch_size: int, rank: int) -> _RankBatches:
    dataset = TokenDataset(data, "train")
    return _RankBatches(dataset, _BatchOrder(SEED, dataset.n_windows(SEQ_LEN), batch_size, rank), SEQ_LEN)


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_worker_item_is_the_loaders_batch_at_that_position(data_dir, world_size):
    ranks = [BatchLoader(data_dir, "train", 2, SEQ_LEN, SEED, rank=r, world_size=world_size)
             for r in range(world_size)]  # fmt: skip
    items = [rank_batches(data_dir, 2, r) for r in range(world_size)]
    n_batches = ranks[0].n_windows // (2 * world_size) + 2  # into the second epoch
    for _ in range(n_batches):
        start = ranks[0].samples_seen
        for loader, item in zip(ranks, items, strict=True):
            inputs, targets = loader.next_batch()
            got_start, got_inputs, got_targets = item[start]
            assert got_start == start
            assert got_inputs.equal(inputs) and got_targets.equal(targets)
            assert got_inputs.dtype == torch.int64 and got_inputs.shape == (2, SEQ_LEN)
            assert got_inputs.is_contiguous() and got_targets.is_contiguous()


def test_what_travels_to_a_worker_holds_no_mapped_data(data_dir):
    items = rank_batches(data_dir, 2, 0)
    expected = items[4]  # opens the dataset and caches a permutation in this process
    assert items._dataset is not None and len(items.order._perm) == items.order.n_windows
    state = items.__getstate__()
    assert state["_dataset"] is None
    assert {k: v for k, v in state.items() if k != "_dataset"} == {
        k: v for k, v in items.__dict__.items() if k != "_dataset"
    }
    # The order goes without its cached permutation: as a freshly made order, which recomputes it.
    fresh = _BatchOrder(SEED, items.order.n_windows, 2, 0).__dict__
    order_state = items.order.__getstate__()
    assert order_state.keys() == fresh.keys()
    for key, value in fresh.items():
        if isinstance(value, np.ndarray):
            assert order_state[key].dtype == value.dtype and order_state[key].shape == value.shape
        else:
            assert order_state[key] == value, key
    assert items.order._perm_epoch == 0  # getstate left this process's cache alone
    copy = pickle.loads(pickle.dumps(items))
    assert copy._dataset is None and copy.order._perm_epoch == -1
    got = copy[4]
    assert got[0] == 4 and got[1].equal(expected[1]) and got[2].equal(expected[2])


def test_shards_of_windows_are_the_shards_each_window_reads(data_dir):
    dataset = TokenDataset(data_dir, "train")
    starts = dataset.shard_starts()

    def shards_read(index: int, seq_len: int) -> set[int]:
        first, last = index * seq_len, index * seq_len + seq_len  # the window's first and last token
        return {s for s in range(len(starts) - 1) if starts[s] <= last and first < starts[s + 1]}

    for seq_len in (1, SEQ_LEN, 700, 5000, 9000):  # a shard holds 5000 tokens at most
        n = dataset.n_windows(seq_len)
        for indices in ([0], [n - 1], list(range(n)), [n - 1, 0, n // 2], []):
            expected = sorted(set().union(*(shards_read(i, seq_len) for i in indices)))
            got = dataset.shards_of_windows(np.array(indices, dtype=np.int64), seq_len)
            assert got == expected, (seq_len, indices)
    # A window that ends on a shard's first token reads that shard.
    assert dataset.shards_of_windows(np.array([starts[1] - 1]), 1) == [0, 1]


def test_check_shard_files_names_the_first_changed_file(data_copy):
    dataset = TokenDataset(data_copy, "train")
    paths, sizes = dataset.shard_paths, dataset.shard_nbytes()
    assert _check_shard_files(paths, sizes) is None
    with pytest.raises(ValueError):  # a length mismatch is a bug, not a data error
        _check_shard_files(paths, sizes[:-1])
    os.truncate(paths[1], sizes[1] - 2)
    paths[2].unlink()
    with pytest.raises(DataError) as err:
        _check_shard_files(paths, sizes)
    assert (
        str(err.value)
        == f"shard {paths[1]} has {sizes[1] - 2} bytes, expected {sizes[1]} (truncated or replaced?)"
    )
    with pytest.raises(DataError) as err:
        _check_shard_files(paths[2:], sizes[2:])
    assert str(err.value) == f"shard {paths[2]} is missing (deleted while the loader was reading it?)"
    assert err.value.__cause__ is None and err.value.__suppress_context__


def first_item_reading(items: _RankBatches, shard: int) -> int:
    """A batch start whose windows read ``shard``."""
    dataset = TokenDataset(items.data_dir, items.split)
    for start in range(0, 10_000, 2):
        if shard in dataset.shards_of_windows(items.order.window_indices(start), SEQ_LEN):
            return start
    raise AssertionError(f"no batch reads shard {shard}")


@pytest.mark.parametrize("damage", ["truncate", "delete", "loop"])
def test_a_damaged_shard_is_one_failure_line_not_an_exception(data_copy, damage):
    items = rank_batches(data_copy, 2, 0)
    start = first_item_reading(items, 1)
    assert isinstance(items[start], tuple)  # opened, with every shard mapped
    shard = items._dataset.shard_paths[1]
    size = shard.stat().st_size
    if damage == "truncate":
        os.truncate(shard, size // 2)
        expected = f"shard {shard} has {size // 2} bytes, expected {size} (truncated or replaced?)"
    elif damage == "delete":  # a deleted file still reads through its mapping: the check says so
        shard.unlink()
        expected = f"shard {shard} is missing (deleted while the loader was reading it?)"
    else:  # stat() fails with an OSError that is not FileNotFoundError
        shard.unlink()
        shard.symlink_to(shard.name)
        expected = f"cannot read shard {shard}: Too many levels of symbolic links"
    assert items[start] == _WorkerFailure(expected)
    # A worker that opens the data only now (a restarted one) reports the manifest's view of it.
    fresh = pickle.loads(pickle.dumps(items))
    failure = fresh[start]
    assert isinstance(failure, _WorkerFailure) and str(shard) in failure.message


def test_a_split_changed_since_the_loader_was_made_is_named(data_copy):
    items = rank_batches(data_copy, 2, 0)
    manifest_path = data_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    last = [s for s in manifest["shards"] if s["split"] == "train"][-1]
    manifest["shards"].remove(last)
    manifest["counts"]["tokens"]["train"] -= last["n_tokens"]
    manifest_path.write_text(json.dumps(manifest))
    now = items.shard_starts[-1] - last["n_tokens"]
    assert items[0] == _WorkerFailure(
        f"split 'train' of {data_copy} changed since the loader was created "
        f"({now} tokens now, {items.shard_starts[-1]} then)"
    )
    assert items._dataset is None  # not kept: the next item checks again


def test_a_split_of_one_token_has_no_window(data_copy):
    manifest_path = data_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    val = [s for s in manifest["shards"] if s["split"] == "val"]
    for shard in val[1:]:
        manifest["shards"].remove(shard)
        (data_copy / shard["file"]).unlink()
    itemsize = np.dtype(manifest["dtype"]).itemsize
    os.truncate(data_copy / val[0]["file"], itemsize)
    val[0]["n_tokens"] = 1
    manifest["counts"]["tokens"]["val"] = 1
    manifest_path.write_text(json.dumps(manifest))
    dataset = TokenDataset(data_copy, "val")
    assert dataset.n_tokens == 1
    assert dataset.n_windows(1) == 0  # a window needs seq_len + 1 tokens


def test_workers_ignore_the_stop_signals_the_training_process_handles(data_dir):
    before = {
        signal.SIGTERM: signal.getsignal(signal.SIGTERM),
        signal.SIGINT: signal.getsignal(signal.SIGINT),
    }
    try:
        _ignore_stop_signals(0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # this process: restored


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status (Linux)")
def test_the_loaders_worker_processes_ignore_sigint_and_sigterm(data_dir):
    import multiprocessing

    before = set(multiprocessing.active_children())
    with BatchLoader(data_dir, "train", 2, SEQ_LEN, SEED, num_workers=1) as loader:
        loader.next_batch()  # the worker has run its init function by now
        (worker,) = [p for p in multiprocessing.active_children() if p not in before]
        status = Path(f"/proc/{worker.pid}/status").read_text()
    ignored = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    assert ignored >> (signal.SIGINT - 1) & 1, "SIGINT not ignored in the worker"
    assert ignored >> (signal.SIGTERM - 1) & 1, "SIGTERM not ignored in the worker"


class _Crash(RuntimeError):
    pass


def crashing_item(self, batch_start):  # replaces _RankBatches.__getitem__ in the (forked) worker
    raise _Crash(f"worker crashed at {batch_start}")


@pytest.mark.parametrize("damaged", [False, True])
def test_a_worker_crash_is_reported_as_the_changed_shard_if_one_changed(data_copy, monkeypatch, damaged):
    """A worker dies of a bug or of SIGBUS (a shard truncated between its check and its read): if a
    shard changed, the one line that names it; else the worker's own error."""
    if torch.multiprocessing.get_start_method() != "fork":
        pytest.skip("the crash is injected into forked workers")
    monkeypatch.setattr(_RankBatches, "__getitem__", crashing_item)
    with BatchLoader(data_copy, "train", 2, SEQ_LEN, SEED, num_workers=1) as loader:
        shard = loader.dataset.shard_paths[-1]
        size = shard.stat().st_size
        if damaged:
            os.truncate(shard, size - 2)
        with pytest.raises(DataError if damaged else _Crash) as err:
            loader.next_batch()
        assert loader._worker_stream is None  # the workers were stopped
        assert loader.samples_seen == 0
    if damaged:
        assert (
            str(err.value) == f"shard {shard} has {size - 2} bytes, expected {size} (truncated or replaced?)"
        )
    else:
        assert "worker crashed at 0" in str(err.value)


def test_a_batch_out_of_order_from_the_workers_stops_them(data_dir, monkeypatch):
    real = _RankBatches.__getitem__

    def shifted(self, batch_start):
        return real(self, batch_start + 2)

    if torch.multiprocessing.get_start_method() != "fork":
        pytest.skip("the fault is injected into forked workers")
    monkeypatch.setattr(_RankBatches, "__getitem__", shifted)
    with BatchLoader(data_dir, "train", 2, SEQ_LEN, SEED, num_workers=1) as loader:
        with pytest.raises(RuntimeError) as err:
            loader.next_batch()
        assert str(err.value) == "worker batch starts at sample 2, loader is at 0"
        assert loader._worker_stream is None
