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

With ``num_workers > 0`` a ``torch.utils.data.DataLoader`` reads the same batches ahead of use in
worker processes: its item ``s`` is this rank's slice of the global batch that starts at global sample
``s``, and its sampler counts ``s`` up from the loader's position. Only batches handed to the caller
advance the position; restoring a state restarts the workers there.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
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
        self.shard_paths = [self.data_dir / s["file"] for s in shards]
        # mode="r": a bug in a consumer cannot write into the shards.
        self._shards = [np.memmap(path, dtype=self.dtype, mode="r") for path in self.shard_paths]
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

    def shard_starts(self) -> list[int]:
        """Token offset of each shard in the split's stream, and the total: (n_shards + 1,)."""
        return [int(start) for start in self._starts]

    def shard_nbytes(self) -> list[int]:
        """Each shard's file size in bytes (as mapped)."""
        return [m.nbytes for m in self._shards]

    def shards_of_windows(self, indices: np.ndarray, seq_len: int) -> list[int]:
        """The shards (positions in ``shard_paths``) that the windows at ``indices`` read from."""
        first = np.searchsorted(self._starts, indices * seq_len, side="right") - 1  # (n,)
        last = np.searchsorted(self._starts, indices * seq_len + seq_len, side="right") - 1  # (n,)
        touched: set[int] = set()
        for lo, hi in zip(first.tolist(), last.tolist(), strict=True):
            touched.update(range(lo, hi + 1))
        return sorted(touched)

    def windows(self, indices: np.ndarray, seq_len: int) -> np.ndarray:
        """The windows at ``indices`` as one int64 array (len(indices), seq_len + 1)."""
        out = np.empty((len(indices), seq_len + 1), dtype=np.int64)
        for row, index in enumerate(indices.tolist()):
            out[row] = self.window(index, seq_len)
        return out


class ShuffledStream:
    """Item `position` of an endless stream over n items: epoch position // n visits them in the
    permutation seeded by (seed, epoch). One epoch's permutation is cached (a batch spans at most
    two). The example loaders of fine-tuning (lmforge.data.sft, lmforge.data.classify) read it."""

    def __init__(self, seed: int, n: int):
        self.seed, self.n = seed, n
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[offset])


def _to_batch(windows: np.ndarray, pin_memory: bool) -> Batch:
    x = torch.from_numpy(windows)  # (B, T+1)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # (B, T) each
    if pin_memory:  # page-locked host memory: .to("cuda", non_blocking=True) overlaps with compute
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    return inputs, targets


class _BatchOrder:
    """Which windows a rank's slice of a global batch holds (the order the module docstring describes)."""

    def __init__(self, seed: int, n_windows: int, batch_size: int, rank: int):
        self.seed = seed
        self.n_windows = n_windows
        self.batch_size = batch_size
        self.rank = rank
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        # The cached permutation is n_windows int64s: a worker recomputes it rather than receive it.
        return {**self.__dict__, "_perm_epoch": -1, "_perm": np.empty(0, dtype=np.int64)}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # one permutation cached: a batch spans at most 2 epochs
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_indices(self, batch_start: int) -> np.ndarray:
        """Windows (batch_size,) of this rank's slice of the global batch that starts at ``batch_start``."""
        first_sample = batch_start + self.rank * self.batch_size
        indices = np.empty(self.batch_size, dtype=np.int64)
        for i, sample in enumerate(range(first_sample, first_sample + self.batch_size)):
            epoch, position = divmod(sample, self.n_windows)
            indices[i] = self._permutation(epoch)[position]
        return indices


@dataclass(frozen=True)
class _WorkerFailure:
    """What a worker returns instead of a batch when the data cannot be read.

    Returned rather than raised: the DataLoader would re-raise an exception wrapped in a multi-line
    traceback, and the user needs the one line that names the file.
    """

    message: str


def _check_shard_files(paths: list[Path], sizes: list[int]) -> None:
    """DataError naming the first of ``paths`` that is gone or no longer ``sizes`` bytes long."""
    for path, size in zip(paths, sizes, strict=True):
        try:
            found = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"shard {path} is missing (deleted while the loader was reading it?)") from None
        if found != size:
            raise DataError(f"shard {path} has {found} bytes, expected {size} (truncated or replaced?)")


class _RankBatches(torch.utils.data.Dataset):
    """A rank's batches, read in DataLoader workers: item ``s`` is its slice of global batch starting at ``s``.

    Only paths and integers travel to the workers, which map the shards themselves on their first item:
    a pickled ``np.memmap`` would be a full in-memory copy of the data (spawn/forkserver start methods).
    """

    def __init__(self, dataset: TokenDataset, order: _BatchOrder, seq_len: int):
        self.data_dir = dataset.data_dir
        self.split = dataset.split
        self.shard_starts = dataset.shard_starts()
        self.shard_nbytes = dataset.shard_nbytes()
        self.order = order
        self.seq_len = seq_len
        self._dataset: TokenDataset | None = None  # opened in the worker

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}

    def _open(self) -> TokenDataset:
        if self._dataset is None:
            dataset = TokenDataset(self.data_dir, self.split)  # DataError names a missing or resized shard
            if dataset.shard_starts() != self.shard_starts:
                raise DataError(
                    f"split '{self.split}' of {self.data_dir} changed since the loader was created "
                    f"({dataset.n_tokens} tokens now, {self.shard_starts[-1]} then)"
                )
            self._dataset = dataset
        return self._dataset

    def __getitem__(self, batch_start: int) -> tuple[int, torch.Tensor, torch.Tensor] | _WorkerFailure:
        try:
            dataset = self._open()
            indices = self.order.window_indices(batch_start)  # (B,)
            # Reading a shard truncated under a live memmap is a SIGBUS that kills the worker without
            # naming the file, and a deleted one still reads: check the files first (a stat per shard
            # touched, small next to the read).
            touched = dataset.shards_of_windows(indices, self.seq_len)
            _check_shard_files(
                [dataset.shard_paths[i] for i in touched], [self.shard_nbytes[i] for i in touched]
            )
            windows = dataset.windows(indices, self.seq_len)  # (B, T+1)
        except DataError as err:
            return _WorkerFailure(str(err))
        except OSError as err:
            return _WorkerFailure(f"cannot read shard {err.filename or self.data_dir}: {err.strerror or err}")
        inputs, targets = _to_batch(windows, pin_memory=False)  # the DataLoader pins, in the main process
        return batch_start, inputs, targets  # the start lets the consumer check the stream's order


class _GlobalBatchStarts(torch.utils.data.Sampler[int]):
    """``start, start + global_batch, ...`` without end: the DataLoader's keys, in stream order."""

    def __init__(self, start: int, global_batch: int):
        self.start = start
        self.global_batch = global_batch

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start, self.global_batch)


def _ignore_stop_signals(worker_id: int) -> None:
    """A scheduler's SIGTERM (or a Ctrl-C's SIGINT) reaches every process of the group, the loader's
    workers too: they ignore it and the training process, which checkpoints first, stops them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BatchLoader:
    """Deterministic, resumable stream of training batches for one data-parallel rank.

    ``next_batch()`` returns ``(inputs, targets)``, int64 tensors (batch_size, seq_len) with
    ``targets[:, t] == inputs[:, t + 1]`` except the last column. Infinite: epochs follow each other.

    ``num_workers > 0`` reads the same batches in that many worker processes, each up to ``prefetch``
    batches ahead; ``close()`` (or ``with BatchLoader(...) as loader:``) stops them.
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
        num_workers: int = 0,
        prefetch: int = 2,
    ):
        # The DataLoader's iterator while workers run. Set first: __del__ runs even if __init__ raises.
        self._worker_stream: Any = None
        self._closed = False
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if num_workers < 0 or prefetch < 1:
            raise DataError(f"num_workers must be >= 0 and prefetch >= 1, got {num_workers} and {prefetch}")
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
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.samples_seen = 0  # global samples, all ranks together; only batches returned count
        self._order = _BatchOrder(seed, self.n_windows, batch_size, rank)

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.n_windows

    def next_batch(self) -> Batch:
        if self._closed:
            raise ValueError("next_batch() on a closed BatchLoader")
        if self.num_workers == 0:
            windows = self.dataset.windows(self._order.window_indices(self.samples_seen), self.seq_len)
            batch = _to_batch(windows, self.pin_memory)
        else:
            batch = self._next_from_workers()
        self.samples_seen += self.batch_size * self.world_size
        return batch

    def _start_workers(self) -> None:
        loader = torch.utils.data.DataLoader(
            _RankBatches(self.dataset, _BatchOrder(self.seed, self.n_windows, self.batch_size, self.rank),
                         self.seq_len),
            batch_size=None,  # items are whole batches
            sampler=_GlobalBatchStarts(self.samples_seen, self.batch_size * self.world_size),
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch,
            pin_memory=self.pin_memory,
            # The workers' base seed is drawn from this generator instead of the global one, so the
            # training's random stream (init, dropout) is the same whatever num_workers.
            generator=torch.Generator(),
            worker_init_fn=_ignore_stop_signals,
        )  # fmt: skip
        self._worker_stream = iter(loader)

    def _stop_workers(self) -> None:
        stream, self._worker_stream = self._worker_stream, None
        if stream is not None:
            # What the DataLoader iterator's __del__ calls; called here because a traceback that holds
            # the iterator would otherwise keep the workers alive. Idempotent.
            stream._shutdown_workers()

    def _next_from_workers(self) -> Batch:
        if self._worker_stream is None:
            self._start_workers()
        try:
            item = next(self._worker_stream)
        except Exception:
            self._stop_workers()
            # A worker died (SIGBUS: a shard truncated between its size check and its read) or hit a
            # bug. A changed shard is the likelier cause and is named in one line; else the error as is.
            _check_shard_files(self.dataset.shard_paths, self.dataset.shard_nbytes())
            raise
        if isinstance(item, _WorkerFailure):
            self._stop_workers()  # the next call restarts them at the same position
            raise DataError(item.message)
        batch_start, inputs, targets = item
        if batch_start != self.samples_seen:  # cannot happen: the stream restarts whenever the position moves
            self._stop_workers()
            raise RuntimeError(
                f"worker batch starts at sample {batch_start}, loader is at {self.samples_seen}"
            )
        return inputs, targets

    def close(self) -> None:
        """Stop the worker processes (if any); later ``next_batch()`` calls raise. Idempotent."""
        self._closed = True
        self._stop_workers()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop_workers()

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
        self._stop_workers()  # their prefetched batches follow the old position; restart at the new one


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
