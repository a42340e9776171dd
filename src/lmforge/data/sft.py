"""Supervised fine-tuning data: chat examples, a chat template, a loss mask, packed or padded rows.

Input: JSONL files (a file, directory or glob), or the built-in `stdlib-docstrings` task
(lmforge.data.builtin); one example per line, either `{"prompt": ..., "response": ...}` (a user turn
and the assistant's answer) or `{"messages": [{"role": "system"|"user"|"assistant", "content": ...},
...]}`. A malformed line is an error naming the file and line (`data.malformed: error`), or is
skipped and counted (`skip`); nothing is dropped without a count.

The chat template is ChatML's, built from two special tokens added to the tokenizer
(`<|im_start|>`, `<|im_end|>`): a tokenizer that has them has the template.

    <|im_start|>user\\nWhat is 2 + 2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n

The loss is on the assistant's content and the `<|im_end|>` that closes it (so the model learns
to stop), nowhere else: prompt positions have target IGNORE_INDEX and contribute no gradient.
`CHAT_TEMPLATE` is the same template in Jinja, for the Hugging Face export's tokenizer_config.json.

Prepared layout (`prepare_sft`): DIR/tokenizer.json (with the chat tokens), DIR/manifest.json
(`kind: sft`, counts), and per split `{split}_ids.npy` (int32, every example's tokens concatenated),
`{split}_trained.npy` (bool, the positions with a loss) and `{split}_offsets.npy` (int64, n + 1).
An example longer than seq_len + 1 tokens is cut there (counted as truncated in the manifest).

Rows (`SFTRows`): a micro-batch of B rows of seq_len positions, (inputs, targets, doc_ids). With
packing, examples follow each other in a row, each its own document (the model restarts positions
and masks attention per document: lmforge.models.packing), an example that does not fit the rest
of a row starting the next; without, one example per row. The rest of a row is padding (the pad
token, target IGNORE_INDEX, a document of its own). The order is a function of the seed, as the
pretraining loader's: epoch e visits the training examples in the permutation seeded by (seed, e);
a global micro-batch is the next B x W rows built from that stream, rank r takes rows [rB, (r+1)B).
The state is the number of examples consumed.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer

from lmforge.data.builtin import STDLIB_DOCSTRINGS, docstring_examples
from lmforge.data.errors import DataError
from lmforge.data.loader import ShuffledStream
from lmforge.data.prepare import _val_score, _write_json_atomic
from lmforge.data.sources import list_files
from lmforge.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_sha256
from lmforge.ops.cross_entropy import IGNORE_INDEX

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

Messages = list[dict[str, str]]


def has_chat_template(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_to_id(token) is not None for token in CHAT_TOKENS)


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the chat tokens added as special tokens (new ids at the end), in place."""
    if not has_chat_template(tokenizer):
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    return tokenizer


def render(
    messages: Messages, tokenizer: Tokenizer, generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation in the chat template, and for each id whether it is trained on
    (the assistant's content and its closing <|im_end|>). generation_prompt: end with an open
    assistant turn, for generating the answer."""
    start, end = (tokenizer.token_to_id(t) for t in CHAT_TOKENS)
    if start is None or end is None:
        raise DataError("the tokenizer has no chat template (no <|im_start|> and <|im_end|> tokens)")
    newline = tokenizer.encode("\n").ids
    ids: list[int] = []
    trained: list[bool] = []
    for message in messages:
        head = [start, *tokenizer.encode(message["role"] + "\n").ids]
        body = [*tokenizer.encode(message["content"]).ids, end]
        learn = message["role"] == "assistant"
        ids += head + body + newline
        trained += [False] * len(head) + [learn] * len(body) + [False] * len(newline)
    if generation_prompt:
        head = [start, *tokenizer.encode("assistant\n").ids]
        ids += head
        trained += [False] * len(head)
    return ids, trained


def parse_example(line: str) -> Messages:
    """One JSONL line -> its messages; ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise ValueError(f"message {index} must be an object with a string 'content'")
            if message.get("role") not in ROLES:
                raise ValueError(
                    f"message {index} has unknown role {message.get('role')!r} (expected one of {', '.join(ROLES)})"
                )
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "prompt" in obj and "response" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["response"], str):
            raise ValueError("'prompt' and 'response' must be strings")
        messages = [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["response"]},
        ]
    else:
        raise ValueError(
            f'expected {{"prompt", "response"}} or {{"messages": [...]}}, got keys {sorted(obj)}'
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message (nothing to learn)")
    return messages


def read_examples(
    source: str, malformed: Literal["error", "skip"]
) -> tuple[list[tuple[str, Messages]], list[str]]:
    """(origin "file:line", messages) of every example of the JSONL files of `source`, and the
    skipped lines' reasons (malformed="skip"; with "error" the first one raises DataError)."""
    if source == STDLIB_DOCSTRINGS:  # the built-in task (lmforge.data.builtin)
        return docstring_examples(), []
    files = [p for p in list_files(source) if p.suffix == ".jsonl"]
    if not files:
        raise DataError(f"SFT data source {source} has no .jsonl file")
    examples, skipped = [], []
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read SFT data file {path}: {err}") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                examples.append((f"{path}:{lineno}", parse_example(line)))
            except ValueError as err:
                if malformed == "error":
                    raise DataError(f"SFT data file {path}, line {lineno}: {err}") from None
                skipped.append(f"{path}, line {lineno}: {err}")
    if not examples:
        raise DataError(f"SFT data source {source} has no valid example ({len(skipped)} lines skipped)")
    return examples, skipped


def prepare_sft(
    source: str,
    out_dir: str | Path,
    tokenizer_path: str | Path,
    seq_len: int,
    val_fraction: float,
    seed: int,
    malformed: Literal["error", "skip"] = "error",
) -> dict[str, Any]:
    """Render, tokenize and split the examples of `source` into `out_dir` (layout above); returns
    the manifest. The tokenizer is `tokenizer_path`'s with the chat tokens added."""
    out_dir = Path(out_dir)
    examples, skipped = read_examples(source, malformed)
    tokenizer = load_tokenizer(tokenizer_path)
    has_tokens = has_chat_template(tokenizer)
    add_chat_tokens(tokenizer)
    splits: dict[str, list[tuple[list[int], list[bool]]]] = {"train": [], "val": []}
    truncated = unlearnable = 0
    for origin, messages in examples:
        ids, trained = render(messages, tokenizer)
        if len(ids) > seq_len + 1:
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
            truncated += 1
            if not any(trained[1:]):  # the cut left none of the answer: nothing to learn from it
                unlearnable += 1
                continue
        splits["val" if _val_score(seed, origin) < val_fraction else "train"].append((ids, trained))
    if len(examples) < 2:
        raise DataError(
            f"SFT data source {source} has {len(examples)} valid example: at least 2 are needed (one for validation)"
        )
    # A small file: at least one example on each side.
    if not splits["val"]:
        splits["val"].append(splits["train"].pop())
    if not splits["train"]:
        splits["train"].append(splits["val"].pop())
    out_dir.mkdir(parents=True, exist_ok=True)
    if has_tokens:  # the same bytes (and sha256) as the model's own tokenizer file
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
    else:
        save_tokenizer(tokenizer, out_dir / "tokenizer.json")
    for split, rows in splits.items():
        lengths = [len(ids) for ids, _ in rows]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        ids_all = np.array([i for ids, _ in rows for i in ids], dtype=np.int32)
        trained_all = np.array([t for _, trained in rows for t in trained], dtype=bool)
        for name, array in (("ids", ids_all), ("trained", trained_all), ("offsets", offsets)):
            np.save(out_dir / f"{split}_{name}.npy", array, allow_pickle=False)
    manifest = {
        "kind": "sft",
        "source": source,
        "seq_len": seq_len,
        "examples": {split: len(rows) for split, rows in splits.items()},
        "skipped": len(skipped),
        "truncated": truncated,
        "dropped_no_answer": unlearnable,
        "tokenizer_sha256": tokenizer_sha256(out_dir / "tokenizer.json"),
    }
    _write_json_atomic(out_dir / "manifest.json", manifest)  # last: a directory with a manifest is complete
    if skipped:
        warnings.warn(
            f"SFT data: skipped {len(skipped)} malformed lines (the first: {skipped[0]})", stacklevel=2
        )
    if truncated:
        warnings.warn(f"SFT data: {truncated} examples longer than {seq_len + 1} tokens were cut there "
                      f"({unlearnable} of them left out: the cut left none of the answer)", stacklevel=2)  # fmt: skip
    return manifest


class SFTDataset:
    """The examples of one split of a prepared SFT directory."""

    def __init__(self, data_dir: str | Path, split: str):
        data_dir = Path(data_dir)
        try:
            self.ids = np.load(data_dir / f"{split}_ids.npy", mmap_mode="r", allow_pickle=False)
            self.trained = np.load(data_dir / f"{split}_trained.npy", mmap_mode="r", allow_pickle=False)
            self.offsets = np.load(data_dir / f"{split}_offsets.npy", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"SFT data directory {data_dir}: cannot read split {split!r} ({err})") from None
        self.lengths = np.diff(self.offsets)  # tokens per example

    def __len__(self) -> int:
        return len(self.lengths)

    def pairs(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of example `index`: its tokens shifted by one, untrained targets ignored."""
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = np.asarray(self.ids[start:stop], dtype=np.int64)
        targets = np.where(self.trained[start + 1 : stop], ids[1:], IGNORE_INDEX)
        return ids[:-1], targets


def row_plan(
    lengths: np.ndarray, order: Iterator[int], n_rows: int, seq_len: int, packing: bool
) -> list[list[int]]:
    """Which examples (indices into `lengths`) fill each of the next `n_rows` rows, taken from `order`
    (fewer rows if it runs out). The example that closed the last row is not in the plan: the
    caller counts what the plan holds and takes up the stream from there."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    pending: int | None = None
    while len(rows) < n_rows:
        index = pending if pending is not None else next(order, None)
        pending = None
        if index is None:
            if current:
                rows.append(current)
            break
        width = int(lengths[index]) - 1  # an example of n tokens gives n - 1 (input, target) pairs
        if current and (not packing or used + width > seq_len):
            rows.append(current)
            current, used = [], 0
            pending = index
            continue
        current.append(index)
        used += width
    return rows


def build_rows(
    dataset: SFTDataset, plan: list[list[int]], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, doc_ids), each (len(plan), seq_len) int64, for the rows of `plan`."""
    inputs = np.full((len(plan), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(plan), seq_len), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.empty((len(plan), seq_len), dtype=np.int64)
    for row, examples in enumerate(plan):
        position = 0
        for doc, index in enumerate(examples):
            x, y = dataset.pairs(index)
            inputs[row, position : position + len(x)] = x
            targets[row, position : position + len(y)] = y
            doc_ids[row, position : position + len(x)] = doc
            position += len(x)
        doc_ids[row, position:] = len(examples)  # the padding: a document of its own
    return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(doc_ids)


class SFTLoader:
    """This rank's micro-batches of SFT rows, in the seeded order the module docstring describes."""

    def __init__(self, data_dir: str | Path, batch_size: int, seq_len: int, seed: int, rank: int,
                 world_size: int, packing: bool, pad_id: int):  # fmt: skip
        self.dataset = SFTDataset(data_dir, "train")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.packing, self.pad_id = rank, world_size, packing, pad_id
        self.consumed = 0  # examples of the global stream used by the batches handed out
        self._order = ShuffledStream(seed, len(self.dataset))

    def _stream(self, start: int) -> Iterator[int]:
        position = start
        while True:
            yield self._order[position]
            position += 1

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        stream = self._stream(self.consumed)
        plan = row_plan(
            self.dataset.lengths, stream, self.batch_size * self.world_size, self.seq_len, self.packing
        )
        self.consumed += sum(len(row) for row in plan)
        mine = plan[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return build_rows(self.dataset, mine, self.seq_len, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed or not isinstance(state.get("consumed"), int):
            raise DataError(f"SFT loader state {state} does not belong to this run (seed {self.seed})")
        self.consumed = state["consumed"]

    def close(self) -> None:
        pass


def val_rows(data_dir: str | Path, batch_size: int, seq_len: int, max_batches: int, packing: bool,
             pad_id: int) -> list[tuple[torch.Tensor, ...]]:  # fmt: skip
    """The validation split's rows in order (the same on every rank), at most max_batches batches."""
    dataset = SFTDataset(data_dir, "val")
    batches: list[tuple[torch.Tensor, ...]] = []
    position = 0
    while position < len(dataset) and len(batches) < max_batches:
        plan = row_plan(dataset.lengths, iter(range(position, len(dataset))), batch_size, seq_len, packing)
        batches.append(build_rows(dataset, plan, seq_len, pad_id))
        position += sum(len(row) for row in plan)
    return batches
