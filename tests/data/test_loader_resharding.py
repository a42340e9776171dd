"""The loader resumes at the right place when the data-parallel degree changes (hashed batches)."""

from __future__ import annotations

import hashlib

import pytest

from lmforge.data.loader import BatchLoader

GLOBAL_BATCH = 8
SEQ_LEN = 16


def sample_hashes(loaders: list[BatchLoader], steps: int) -> list[str]:
    """Hashes of every sample of `steps` global batches, in global order (rank by rank)."""
    hashes = []
    for _ in range(steps):
        for loader in loaders:  # rank 0, 1, ...: each takes its own slice of the global batch
            inputs, targets = loader.next_batch()
            for row in range(inputs.shape[0]):
                data = inputs[row].numpy().tobytes() + targets[row, -1:].numpy().tobytes()
                hashes.append(hashlib.sha256(data).hexdigest())
    return hashes


def ranks(data_dir, world_size: int) -> list[BatchLoader]:
    return [BatchLoader(data_dir, "train", GLOBAL_BATCH // world_size, SEQ_LEN, seed=3, rank=r, world_size=world_size)
            for r in range(world_size)]  # fmt: skip


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 4), (4, 2)])
def test_changing_the_data_parallel_degree_skips_and_repeats_nothing(prepared_dir, before, after):
    straight = sample_hashes(ranks(prepared_dir, 1), 10)

    first = ranks(prepared_dir, before)
    seen = sample_hashes(first, 4)
    state = first[0].state_dict()
    assert all(loader.state_dict() == state for loader in first)  # the position is global
    resumed = ranks(prepared_dir, after)
    for loader in resumed:
        loader.load_state_dict(state)
    seen += sample_hashes(resumed, 6)

    assert seen == straight
    assert len(set(straight)) == len(straight)  # distinct windows: a repeat would show
