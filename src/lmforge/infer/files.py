"""Batch inference over a JSONL file of prompts: resumable, and split over ranks under torchrun.

Input: one JSON object per line with a "prompt" string. Output: one JSON line per prompt, in input
order: {"prompt", "completion", "tokens" (new tokens), "finish_reason" ("eos", "stop", "length")}.

Rank r of W takes prompts r, r + W, r + 2W, ... and appends each finished batch to its own part file
(`OUT.part-r`, each line tagged with its prompt's index) and flushes it to disk. After a barrier,
rank 0 merges the parts in input order into `OUT.tmp` and renames it to OUT (os.replace: OUT is
either absent or complete), then removes the parts. One process is the case W = 1. With tensor
parallelism (`generate --tp`) a rank here is one model's group of processes: they decode the same
batches in lockstep and the first of them writes.

Resuming after a crash: what the part files (and an OUT from an earlier run, whose lines are done)
hold is skipped; a torn last line, cut mid-write by the crash, is dropped. Greedy output does not
depend on the batch size or the number of ranks (a row's greedy tokens do not depend on the rows
beside it); sampled output does, since each batch draws from one generator (seeded with the seed
plus the index of the batch's first prompt).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.errors import ConfigError
from lmforge.infer.generate import completion_of, generate_batch_detailed
from lmforge.infer.sampling import SamplingParams
from lmforge.models import FamilyModel


def read_prompts(path: Path) -> list[str]:
    """The "prompt" of each line of a JSONL file; ConfigError naming the line of a bad one."""
    if not path.is_file():
        raise ConfigError(f"--input {path} does not exist")
    prompts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"--input {path} line {number} is not JSON: {error}") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f'--input {path} line {number} has no "prompt" string: {line.strip()[:80]}')
            prompts.append(record["prompt"])
    return prompts


def _cut_torn_line(path: Path) -> None:
    """Cut a last line without its newline (a crash mid-write) off the file, if it exists."""
    if path.exists():
        complete_lines(path, truncate=True, parse=False)


def complete_lines(path: Path, truncate: bool, parse: bool = True) -> list[dict]:
    """The JSON records of a file's complete lines (none if it does not exist).

    A last line without its newline was cut by a crash: it is dropped, and with truncate=True also
    cut off the file, so that appending goes on from the last complete line. parse=False: only that.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    if truncate and end < len(data):
        with path.open("r+b") as file:
            file.truncate(end)
    if not parse:
        return []
    records = []
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ConfigError(f"{path} line {number} is not JSON: remove the file to start over") from None
    return records


def _part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}")


def generate_file(
    model: FamilyModel,
    tokenizer,  # tokenizers.Tokenizer
    input_path: str | Path,
    output_path: str | Path,
    params: SamplingParams,
    *,
    batch_size: int = 8,
    eos_id: int | None = None,
    encode: Callable[[str], list[int]] | None = None,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    rank: int = 0,
    world_size: int = 1,
    writer: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> dict[str, object]:
    """Generate a completion for every prompt of `input_path` into `output_path` (see the module doc).

    encode: prompt text -> ids (default: the tokenizer's encoding; `lmforge generate --chat` renders
    the chat template). barrier: waits for every process (torch.distributed.barrier under torchrun).
    writer: False on the processes of a tensor-parallel model other than its first: they compute the
    same share (rank of world_size model replicas) in lockstep and write nothing.
    Returns what this rank did: {"prompts" (in the file), "skipped" (done before), "generated" (by
    this rank), "new_tokens", "seconds"}, and on rank 0 "output" once the merged file is written.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    input_path, output_path = Path(input_path), Path(output_path)
    prompts = read_prompts(input_path)
    encode = encode or (lambda text: tokenizer.encode(text).ids)
    eos_id = tokenizer.token_to_id("<|eos|>") if eos_id is None else eos_id

    finished = complete_lines(output_path, truncate=False)  # an earlier run's complete output
    _check_same_prompts(finished, range(len(finished)), prompts, output_path)
    if writer:  # a torn last line of this rank's own part (a crash mid-write) is cut off first
        _cut_torn_line(_part_path(output_path, rank))
    barrier()  # then every process reads the same parts (and fails alike on a bad one), so that a
    # model's processes agree on the work
    done = {}
    for part in sorted(output_path.parent.glob(f"{output_path.name}.part-*")):
        records = complete_lines(part, truncate=False)
        _check_same_prompts(records, [r.get("index", -1) for r in records], prompts, part)
        done.update({r["index"]: r for r in records})
    mine = [i for i in range(len(finished), len(prompts)) if i % world_size == rank and i not in done]

    started = time.perf_counter()
    new_tokens = 0
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        part_file = (
            stack.enter_context(_part_path(output_path, rank).open("a", encoding="utf-8")) if writer else None
        )
        for first in range(0, len(mine), batch_size):
            indices = mine[first : first + batch_size]
            batch_params = params if params.seed is None else replace(params, seed=params.seed + indices[0])
            generations = generate_batch_detailed(
                model, [encode(prompts[i]) for i in indices], batch_params,
                eos_id=eos_id, tokenizer=tokenizer, dtype=dtype, compile=compile,
            )  # fmt: skip
            for index, generation in zip(indices, generations, strict=True):
                completion = completion_of(generation, tokenizer.decode, params.stop, eos_id)
                record = {"index": index, "prompt": prompts[index], "completion": completion.text,
                          "tokens": len(completion.token_ids), "finish_reason": completion.finish_reason}  # fmt: skip
                if part_file is not None:
                    part_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                new_tokens += len(completion.token_ids)
            if part_file is not None:
                part_file.flush()
                os.fsync(part_file.fileno())  # a finished batch survives a crash of the machine too
    summary: dict[str, object] = {"prompts": len(prompts), "skipped": len(finished) + len(done), "generated": len(mine),
               "new_tokens": new_tokens, "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
    barrier()  # every rank's part is complete
    if rank == 0 and writer:
        _merge(output_path, prompts, finished)
        summary["output"] = str(output_path)
    barrier()  # no rank returns before the output exists
    return summary


def _check_same_prompts(records: list[dict], indices, prompts: list[str], path: Path) -> None:
    """ConfigError if an earlier output was made from other prompts (resuming would mix two inputs)."""
    for index, record in zip(indices, records, strict=True):
        if not 0 <= index < len(prompts) or record.get("prompt") != prompts[index]:
            raise ConfigError(
                f"{path} holds an output for another prompts file (line of prompt {index} differs): "
                "remove it or write to another --output"
            )


def _merge(output_path: Path, prompts: list[str], finished: list[dict]) -> None:
    """Rank 0, after every rank finished: OUT = the earlier output + the parts, in input order."""
    by_index: dict[int, dict] = {}
    parts = sorted(output_path.parent.glob(f"{output_path.name}.part-*"))
    for part in parts:
        for record in complete_lines(part, truncate=False):
            by_index.setdefault(record.pop("index"), record)
    missing = [i for i in range(len(finished), len(prompts)) if i not in by_index]
    if missing:
        raise ConfigError(f"the part files of {output_path} lack prompts {missing[:5]}: run again to resume")
    tmp = output_path.with_name(output_path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for record in [*finished, *(by_index[i] for i in range(len(finished), len(prompts)))]:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, output_path)
    for part in parts:
        part.unlink()
