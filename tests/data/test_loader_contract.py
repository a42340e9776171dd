"""The loader's edges, one assertion each: the arguments it refuses (named in the message) and the
boundary values it accepts, the state it saves, and empty and end-of-stream token ranges. Written
against the mutants that survived tests/data's behaviour tests (docs/reliability.md)."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.errors import DataError
from lmforge.data.loader import BatchLoader, TokenDataset, val_batches

SEQ_LEN = 16


@pytest.fixture(scope="module")
def data_dir(small_prepared):
    return small_prepared[0]


def loader(data_dir, **overrides) -> BatchLoader:
    return BatchLoader(**{"data_dir": data_dir, "split": "train", "batch_size": 2, "seq_len": SEQ_LEN, "seed": 0,
                          **overrides})  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "batch_size and seq_len must be positive, got 0 and 16"),
        ({"seq_len": 0}, "batch_size and seq_len must be positive, got 2 and 0"),
        ({"num_workers": -1}, "num_workers must be >= 0 and prefetch >= 1, got -1 and 2"),
        ({"prefetch": 0}, "num_workers must be >= 0 and prefetch >= 1, got 0 and 0"),
        ({"rank": 2, "world_size": 2}, "rank 2 is not in [0, world_size=2)"),
    ],
)
def test_refused_arguments_are_named(data_dir, overrides, message):
    with pytest.raises(DataError) as err:
        loader(data_dir, **overrides)
    assert str(err.value) == message


def test_the_smallest_accepted_values(data_dir):
    smallest = loader(data_dir, batch_size=1, seq_len=1, prefetch=1)
    inputs, targets = smallest.next_batch()
    assert inputs.shape == targets.shape == (1, 1)


def test_defaults_read_in_process_without_pinning(data_dir):
    default = loader(data_dir)
    assert (default.num_workers, default.prefetch, default.pin_memory) == (0, 2, False)
    # Pinning is asked for: done only where there is CUDA (and the batches come either way).
    asked = loader(data_dir, pin_memory=True)
    assert asked.pin_memory == torch.cuda.is_available()
    inputs, _ = asked.next_batch()
    assert inputs.is_pinned() == torch.cuda.is_available()


def test_a_closed_loader_says_so(data_dir):
    closed = loader(data_dir)
    closed.close()
    with pytest.raises(ValueError) as err:
        closed.next_batch()
    assert str(err.value) == "next_batch() on a closed BatchLoader"


def test_state_dict_holds_the_position_and_what_must_match(data_dir):
    source = loader(data_dir)
    source.next_batch()
    state = source.state_dict()
    assert state == {"samples_seen": 2, "seed": 0, "seq_len": SEQ_LEN, "n_tokens": source.dataset.n_tokens}
    fresh = loader(data_dir)
    fresh.load_state_dict({**state, "samples_seen": 0})  # the start is a valid position
    assert fresh.samples_seen == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": None}, "loader state lacks integer 'seed'"),
        ({"samples_seen": "3"}, "loader state lacks integer 'samples_seen'"),
        ({"samples_seen": -1}, "loader state has negative samples_seen -1"),
        ({"n_tokens": 1}, "loader state has n_tokens=1 but this loader has n_tokens="),
        ({"seq_len": 8}, "loader state has seq_len=8 but this loader has seq_len=16"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_by_name(data_dir, change, message):
    target = loader(data_dir)
    state = {**target.state_dict(), **change}
    with pytest.raises(DataError) as err:
        target.load_state_dict(state)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("batch_size", "max_batches", "message"),
    [(0, 1, "got 0 and 1"), (1, 0, "got 1 and 0")],
)
def test_val_batches_refuse_a_size_that_is_not_positive(data_dir, batch_size, max_batches, message):
    with pytest.raises(DataError) as err:
        val_batches(data_dir, batch_size, SEQ_LEN, max_batches)
    assert str(err.value) == f"batch_size and max_batches must be positive, {message}"


def test_token_ranges_at_their_edges(data_dir):
    dataset = TokenDataset(data_dir, "train")
    n = dataset.n_tokens
    empty = dataset.tokens(5, 5)
    assert empty.shape == (0,) and empty.dtype == dataset.dtype
    tail = dataset.tokens(n - 5, n)  # up to the very end
    assert len(tail) == 5
    with pytest.raises(IndexError) as err:
        dataset.tokens(0, n + 1)
    assert str(err.value) == f"tokens [0, {n + 1}) out of range for {n} tokens"
    # Windows of seq_len + 1 tokens at stride seq_len: with seq_len = n - 1, exactly one.
    assert dataset.n_windows(n - 1) == 1 and dataset.n_windows(1) == n - 1
    with pytest.raises(DataError, match="seq_len must be positive, got 0"):
        dataset.n_windows(0)
    assert not any(shard.flags.writeable for shard in dataset._shards)  # mapped read-only


def test_an_unknown_split_is_named(data_dir):
    with pytest.raises(DataError) as err:
        TokenDataset(data_dir, "test")
    assert str(err.value) == "split must be one of train, val, got 'test'"


def test_a_worker_batch_is_the_in_process_batch(data_dir):
    """Workers hand over whole (B, T) batches, not batches of batches."""
    with loader(data_dir) as in_process, loader(data_dir, num_workers=1) as workers:
        for _ in range(2):
            (a_inputs, a_targets), (b_inputs, b_targets) = in_process.next_batch(), workers.next_batch()
            assert b_inputs.shape == b_targets.shape == (2, SEQ_LEN)
            assert b_inputs.equal(a_inputs) and b_targets.equal(a_targets)
