"""Read prepared token shards: a memory-mapped dataset, the training batch stream, val batches.

Samples are windows of ``seq_len + 1`` tokens starting at multiples of ``seq_len`` of a split's token
stream (its shards concatenated in manifest order): window ``i`` is ``tokens[i*T : i*T + T + 1]``,
``inputs = window[:-1]``, ``targets = window[1:]``. The inputs of consecutive windows do not overlap
and every token is a target once; a window only shares its last token with the next window's first.

The training stream is a function of ``seed`` only: epoch ``e`` visits all windows in the order of a
permutation seeded by ``(seed, e)``; global sample ``s`` is window ``perm_{s // n}[s % n]``. Global
batch ``k`` is samples ``[k*B*W, (k+1)*B*W)`` for batch size ``B`` per rank and ``W`` ranks, and rank
``r`` takes the ``r``-th slice of ``B`` of them: the same global batch whatever ``W``, so a run can
resume with a different data-parallel degree. The loader's whole state is the number of global
samples seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.errors import DataError
from lmforge.data.prepare import SPLITS, load_manifest

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (B, T) int64


class TokenDataset:
    """The token stream of one split of a prepared directory, memory-mapped read-only."""

    def __init__(self, data_dir: str | Path, split: str):
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = load_manifest(self.data_dir)
        self.dtype = np.dtype(self.manifest["dtype"])
        shards = [s for s in self.manifest["shards"] if s["split"] == split]
        # mode="r": a bug in a consumer cannot write into the shards.
        self._shards = [np.memmap(self.data_dir / s["file"], dtype=self.dtype, mode="r") for s in shards]
        self._starts = np.cumsum([0] + [len(m) for m in self._shards])  # (n_shards + 1,)
        self.n_tokens = int(self._starts[-1])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """``tokens[start:stop]`` of the split's stream (a copy when it spans shards)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"tokens [{start}, {stop}) out of range for {self.n_tokens} tokens")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        shard = first
        while start < stop:
            offset = start - int(self._starts[shard])
            take = min(stop - start, len(self._shards[shard]) - offset)
            parts.append(self._shards[shard][offset : offset + take])
            start += take
            shard += 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def n_windows(self, seq_len: int) -> int:
        """How many windows of ``seq_len + 1`` tokens, at stride ``seq_len``, the split holds."""
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        return max(self.n_tokens - 1, 0) // seq_len

    def window(self, index: int, seq_len: int) -> np.ndarray:
        """Window ``index``: ``seq_len + 1`` tokens from ``index * seq_len``."""
        return self.tokens(index * seq_len, index * seq_len + seq_len + 1)

    def windows(self, indices: np.ndarray, seq_len: int) -> np.ndarray:
        """The windows at ``indices`` as one int64 array (len(indices), seq_len + 1)."""
        out = np.empty((len(indices), seq_len + 1), dtype=np.int64)
        for row, index in enumerate(indices.tolist()):
            out[row] = self.window(index, seq_len)
        return out


def _to_batch(windows: np.ndarray, pin_memory: bool) -> Batch:
    x = torch.from_numpy(windows)  # (B, T+1)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # (B, T) each
    if pin_memory:  # page-locked host memory: .to("cuda", non_blocking=True) overlaps with compute
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    return inputs, targets


class BatchLoader:
    """Deterministic, resumable stream of training batches for one data-parallel rank.

    ``next_batch()`` returns ``(inputs, targets)``, int64 tensors (batch_size, seq_len) with
    ``targets[:, t] == inputs[:, t + 1]`` except the last column. Infinite: epochs follow each other.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset = TokenDataset(data_dir, split)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.n_windows = self.dataset.n_windows(seq_len)
        global_batch = batch_size * world_size
        if self.n_windows < global_batch:
            raise DataError(
                f"split '{split}' of {data_dir} has {self.dataset.n_tokens} tokens = {self.n_windows} windows of "
                f"seq_len {seq_len}, fewer than one global batch of {global_batch} "
                f"(batch_size {batch_size} x world_size {world_size}): use more data or smaller batches"
            )
        self.samples_seen = 0  # global samples, all ranks together
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # one permutation cached: a batch spans at most 2 epochs
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def _window_indices(self, first_sample: int, n: int) -> np.ndarray:
        indices = np.empty(n, dtype=np.int64)
        for i, sample in enumerate(range(first_sample, first_sample + n)):
            epoch, position = divmod(sample, self.n_windows)
            indices[i] = self._permutation(epoch)[position]
        return indices

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.n_windows

    def next_batch(self) -> Batch:
        first = self.samples_seen + self.rank * self.batch_size
        windows = self.dataset.windows(self._window_indices(first, self.batch_size), self.seq_len)
        self.samples_seen += self.batch_size * self.world_size
        return _to_batch(windows, self.pin_memory)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """JSON-serialisable position; the same on every rank (it counts global samples)."""
        return {
            "samples_seen": self.samples_seen,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_tokens": self.dataset.n_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the following batches are those the saved loader would have produced next.

        The batch size and world size may differ from the saved run's; the seed, seq_len and data
        may not (the stream would be a different one).
        """
        for key in ("samples_seen", "seed"):
            if not isinstance(state.get(key), int):
                raise DataError(f"loader state lacks integer '{key}': {state}")
        expected = {"seed": self.seed, "seq_len": self.seq_len, "n_tokens": self.dataset.n_tokens}
        for key, value in expected.items():
            if key in state and state[key] != value:
                raise DataError(f"loader state has {key}={state[key]} but this loader has {key}={value}")
        if state["samples_seen"] < 0:
            raise DataError(f"loader state has negative samples_seen {state['samples_seen']}")
        self.samples_seen = state["samples_seen"]


def val_batches(data_dir: str | Path, batch_size: int, seq_len: int, max_batches: int) -> list[Batch]:
    """Fixed evaluation batches: the val split's first windows in order, no shuffle, same every call.

    Up to ``max_batches`` full batches; a val split smaller than one batch gives one smaller batch.
    """
    if batch_size < 1 or max_batches < 1:
        raise DataError(f"batch_size and max_batches must be positive, got {batch_size} and {max_batches}")
    dataset = TokenDataset(data_dir, "val")
    n_windows = dataset.n_windows(seq_len)
    if n_windows == 0:
        raise DataError(
            f"val split of {data_dir} has {dataset.n_tokens} tokens, not one window of seq_len {seq_len} + 1"
        )
    n_batches = min(max_batches, max(n_windows // batch_size, 1))
    batches = []
    for k in range(n_batches):
        indices = np.arange(k * batch_size, min((k + 1) * batch_size, n_windows))
        batches.append(_to_batch(dataset.windows(indices, seq_len), pin_memory=False))
    return batches
