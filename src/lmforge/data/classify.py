"""Text classification data: texts with string labels, tokenized, split, batched.

Input: CSV (a header with `text` and `label` columns) or JSONL (`{"text": ..., "label": ...}`)
files (a file, a directory or a glob), or the built-in `stdlib-packages` task (lmforge.data.builtin).
An optional `group` column/key keeps examples of one group in one split (the built-in task groups
chunks by source file, so no file is in both); the split is stratified by label (`val_groups`). A
malformed line or row is an error naming the file and line (`data.malformed: error`), or is skipped
and counted (`skip`).

Each text is `<|bos|>` + its tokens, cut at seq_len (counted as truncated): the first token is the
one an encoder classifies from, the last real token the one a decoder does. Labels are strings,
mapped to ids in sorted order; the mapping is in the prepared directory's manifest and in the
run's config (`data.labels`).

Prepared layout (`prepare_classify`): DIR/tokenizer.json, DIR/manifest.json (`kind: classify`,
labels, counts) and per split `{split}_ids.npy` (int32, concatenated), `{split}_offsets.npy` (int64,
n + 1), `{split}_labels.npy` (int64). Batches (`ClassifyLoader`): (inputs (B, T) right-padded with
<|pad|>, labels (B,), pad_mask (B, T) bool), in the order of a permutation seeded by (seed, epoch);
a global batch is B x W examples, rank r takes [rB, (r+1)B). The state is the number of examples
consumed.
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.data.builtin import STDLIB_PACKAGES, package_examples
from lmforge.data.errors import DataError
from lmforge.data.loader import ShuffledStream
from lmforge.data.prepare import _val_score, _write_json_atomic
from lmforge.data.sources import list_files
from lmforge.data.tokenizer import load_tokenizer, special_ids, tokenizer_sha256

Example = tuple[str, str, str]  # (group, text, label)


def _field(row: Any, path: Path, where: str) -> tuple[str, str, str]:
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with 'text' and 'label', got {type(row).__name__}")
    missing = [key for key in ("text", "label") if row.get(key) in (None, "")]
    if missing:
        raise ValueError(f"'{missing[0]}' is missing or empty")
    if not isinstance(row["text"], str) or not isinstance(row["label"], str | int):
        raise ValueError("'text' must be a string and 'label' a string or an integer")
    return str(row.get("group") or where), row["text"], str(row["label"])


def read_labelled(source: str, malformed: Literal["error", "skip"]) -> tuple[list[Example], list[str]]:
    """The (group, text, label) examples of `source` and the skipped lines' reasons."""
    if source == STDLIB_PACKAGES:
        return package_examples(), []
    files = [p for p in list_files(source) if p.suffix in (".jsonl", ".csv")]
    if not files:
        raise DataError(f"classification data source {source} has no .csv or .jsonl file")
    examples: list[Example] = []
    skipped: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read classification data file {path}: {err}") from None
        if path.suffix == ".csv":
            reader = csv.DictReader(text.splitlines())
            if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
                raise DataError(
                    f"classification data file {path}: the header must name 'text' and 'label' columns"
                )
            rows: list[tuple[int, Any]] = [(reader.line_num, row) for row in reader]
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append((lineno, json.loads(line)))
                    except json.JSONDecodeError as err:
                        rows.append((lineno, ValueError(f"not JSON ({err.msg} at column {err.colno})")))
        for lineno, row in rows:
            try:
                if isinstance(row, ValueError):
                    raise row
                examples.append(_field(row, path, f"{path}:{lineno}"))
            except ValueError as err:
                if malformed == "error":
                    raise DataError(f"classification data file {path}, line {lineno}: {err}") from None
                skipped.append(f"{path}, line {lineno}: {err}")
    return examples, skipped


def val_groups(examples: list[Example], val_fraction: float, seed: int) -> set[str]:
    """The groups held out for validation, stratified by label: for each label, whole groups in the
    order of their seeded hash, each taken if it brings the label's held-out share closer to
    val_fraction of its examples (a group too big to fit is passed over for smaller ones), until the
    share is reached; no group is held out that would leave any of its labels without a training
    example. A group counts for its most frequent label; groups of one example (no group given) give
    an exactly stratified split. A plain hash per group would leave a label out of validation, or
    hold out most of it, when a few groups are large (the built-in task's files: 6 of its 11
    packages were in validation, half of it asyncio)."""
    sizes: dict[str, Counter[str]] = {}
    for group, _, label in examples:
        sizes.setdefault(group, Counter())[label] += 1
    by_label: dict[str, list[tuple[float, str, int]]] = {}
    for group, labels in sizes.items():
        label = labels.most_common(1)[0][0]
        by_label.setdefault(label, []).append((_val_score(seed, group), group, labels.total()))
    in_training = Counter(label for _, _, label in examples)
    held_out: set[str] = set()
    for groups in by_label.values():
        goal = val_fraction * sum(n for _, _, n in groups)
        taken = 0
        for _, group, n in sorted(groups):
            if taken >= goal:
                break
            keeps_every_label = all(in_training[label] > count for label, count in sizes[group].items())
            if keeps_every_label and abs(taken + n - goal) < abs(taken - goal):
                held_out.add(group)
                taken += n
                in_training.subtract(sizes[group])
    return held_out


def prepare_classify(source: str, out_dir: str | Path, tokenizer_path: str | Path, seq_len: int,
                     val_fraction: float, seed: int, malformed: Literal["error", "skip"] = "error") -> dict[str, Any]:  # fmt: skip
    """Tokenize, label and split the examples of `source` into `out_dir`; returns the manifest."""
    out_dir = Path(out_dir)
    examples, skipped = read_labelled(source, malformed)
    labels = sorted({label for _, _, label in examples})
    if len(labels) < 2:
        raise DataError(
            f"classification data source {source} has {len(labels)} label(s): at least 2 are needed"
        )
    tokenizer = load_tokenizer(tokenizer_path)
    bos = special_ids(tokenizer)["bos"]
    index = {label: i for i, label in enumerate(labels)}
    encodings = tokenizer.encode_batch([text for _, text, _ in examples])
    held_out = val_groups(examples, val_fraction, seed)
    splits: dict[str, list[tuple[list[int], int]]] = {"train": [], "val": []}
    truncated = 0
    for (group, _, label), encoding in zip(examples, encodings, strict=True):
        ids = [bos, *encoding.ids]
        if len(ids) > seq_len:
            ids, truncated = ids[:seq_len], truncated + 1
        splits["val" if group in held_out else "train"].append((ids, index[label]))
    for split, rows in splits.items():
        if not rows:
            raise DataError(
                f"classification data source {source}: the {split} split is empty (val_fraction {val_fraction})"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
    for split, rows in splits.items():
        offsets = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in rows])]).astype(np.int64)
        np.save(out_dir / f"{split}_ids.npy", np.array([i for ids, _ in rows for i in ids], dtype=np.int32))
        np.save(out_dir / f"{split}_offsets.npy", offsets)
        np.save(out_dir / f"{split}_labels.npy", np.array([label for _, label in rows], dtype=np.int64))
    manifest = {
        "kind": "classify",
        "source": source,
        "seq_len": seq_len,
        "labels": labels,
        "examples": {split: len(rows) for split, rows in splits.items()},
        "skipped": len(skipped),
        "truncated": truncated,
        "tokenizer_sha256": tokenizer_sha256(out_dir / "tokenizer.json"),
    }
    _write_json_atomic(out_dir / "manifest.json", manifest)  # last: a directory with a manifest is complete
    if skipped:
        warnings.warn(f"classification data: skipped {len(skipped)} malformed lines (the first: {skipped[0]})",
                      stacklevel=2)  # fmt: skip
    return manifest


def labels_of(data_dir: str | Path) -> list[str]:
    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise DataError(
            f"classification data directory {data_dir}: no readable manifest.json ({err})"
        ) from None
    if manifest.get("kind") != "classify" or not isinstance(manifest.get("labels"), list):
        raise DataError(f"data directory {data_dir} was not prepared for classification")
    return [str(label) for label in manifest["labels"]]


class LabelledDataset:
    """The examples of one split of a prepared classification directory."""

    def __init__(self, data_dir: str | Path, split: str):
        data_dir = Path(data_dir)
        try:
            self.ids = np.load(data_dir / f"{split}_ids.npy", mmap_mode="r", allow_pickle=False)
            self.offsets = np.load(data_dir / f"{split}_offsets.npy", allow_pickle=False)
            self.labels = np.load(data_dir / f"{split}_labels.npy", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(
                f"classification data directory {data_dir}: cannot read split {split!r} ({err})"
            ) from None

    def __len__(self) -> int:
        return len(self.labels)


def pad_rows(sequences: list[Any], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, T) right-padded with pad_id, pad_mask (B, T) bool) of token sequences (each cut at T)."""
    inputs = np.full((len(sequences), seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), seq_len), dtype=bool)
    for row, ids in enumerate(sequences):
        n = min(len(ids), seq_len)
        inputs[row, :n] = ids[:n]
        mask[row, :n] = True
    return torch.from_numpy(inputs), torch.from_numpy(mask)


def _with_labels(dataset: LabelledDataset, indices: list[int], seq_len: int, pad_id: int):
    inputs, mask = pad_rows(
        [dataset.ids[dataset.offsets[i] : dataset.offsets[i + 1]] for i in indices], seq_len, pad_id
    )
    return inputs, torch.from_numpy(dataset.labels[indices].copy()), mask


class ClassifyLoader:
    """This rank's batches of (inputs, labels, pad_mask), in the seeded order of the module docstring."""

    def __init__(self, data_dir: str | Path, batch_size: int, seq_len: int, seed: int, rank: int,
                 world_size: int, pad_id: int):  # fmt: skip
        self.dataset = LabelledDataset(data_dir, "train")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.consumed = 0
        self._order = ShuffledStream(seed, len(self.dataset))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start = self.consumed + self.rank * self.batch_size
        indices = [self._order[position] for position in range(start, start + self.batch_size)]
        self.consumed += self.batch_size * self.world_size
        return _with_labels(self.dataset, indices, self.seq_len, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed or not isinstance(state.get("consumed"), int):
            raise DataError(
                f"classification loader state {state} does not belong to this run (seed {self.seed})"
            )
        self.consumed = state["consumed"]

    def close(self) -> None:
        pass


def val_examples(data_dir: str | Path, batch_size: int, seq_len: int, max_batches: int,
                 pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """The validation split in order, at most max_batches batches (the same on every rank)."""
    dataset = LabelledDataset(data_dir, "val")
    n = min(len(dataset), batch_size * max_batches)
    return [
        _with_labels(dataset, list(range(i, min(i + batch_size, n))), seq_len, pad_id)
        for i in range(0, n, batch_size)
    ]
