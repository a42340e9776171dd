"""Autoregressive generation with a KV cache, as small phase functions, one prompt or a batch.

prefill runs the whole prompt once and fills every layer's KV cache; decode_one_token then feeds
one token per row, attending over the cache instead of recomputing the prefix, so each new token
costs one position's worth of compute instead of the whole sequence's; sample picks the token
(lmforge.infer.sampling).

`DecodeBatch` holds a cache of B rows, each its own sequence with its own length: `prefill_row`
fills one row while the others keep theirs, `decode_step` feeds one token to every row at that
row's own position. `generate_batch` runs it over prompts of different lengths; a server's
continuous batching can run the same two calls, prefilling a new request into a free row between
decode steps. The decode loop does not wait for the host on each token: rows that end (eos, their
token budget) are masked on the device, and the host looks only every `check_every` steps, to see
whether every row is done and to look for stop strings. `generate` is the one-prompt iterator that
`lmforge generate` streams from (it reads each token as it comes, to print it).

`compile=True` runs the decode step through torch.compile with static shapes (the cache is
preallocated, so the shapes never change while a batch decodes).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from lmforge.infer.sampling import SamplingParams, check_sampling_args, penalize_repeats, sample
from lmforge.infer.stop import TextStream
from lmforge.models import FamilyModel, spec_of
from lmforge.models.kv_cache import kv_caches, writing_row
from lmforge.models.stacking import stacked_weights
from lmforge.runtime import autocast

__all__ = [
    "Completion",
    "DecodeBatch",
    "Generation",
    "SamplingParams",
    "check_sampling_args",
    "complete",
    "complete_batch",
    "decode_one_token",
    "generate",
    "generate_batch",
    "prefill",
    "sample",
]


class Detokenizer(Protocol):
    """What stop strings need of a tokenizer (a tokenizers.Tokenizer is one)."""

    def decode(self, ids: list[int]) -> str: ...


# ---------------------------------------------------------------------------------------------------
# Phase functions
# ---------------------------------------------------------------------------------------------------


def prefill(model: FamilyModel, prompt: Tensor) -> Tensor:
    """prompt (B, T) → logits of the last position (B, V); fills the KV cache for positions 0..T-1."""
    input_pos = torch.arange(prompt.size(1), device=prompt.device)
    return model(prompt, input_pos=input_pos)[:, -1, :]


def decode_one_token(model: FamilyModel, token: Tensor, pos: int | Tensor) -> Tensor:
    """token (B, 1) at absolute position `pos` → logits (B, V).

    pos: an int, the same position for every row, or a (B,) long tensor, each row's own.
    """
    input_pos = (
        torch.tensor([pos], device=token.device) if isinstance(pos, int) else pos[:, None]
    )  # (1,) | (B, 1)
    return model(token, input_pos=input_pos)[:, -1, :]


# decode_one_token under its own code object (dynamo keeps compiled code per code object), for the
# models whose compiled step breaks around modules that run eagerly: see compiled_decode_one_token.
_decode_one_token_around_eager_modules = types.FunctionType(
    decode_one_token.__code__.replace(co_name="decode_one_token_around_eager_modules"),
    decode_one_token.__globals__,
)


@functools.cache
def compiled_decode_one_token(
    device_type: str, fullgraph: bool = True
) -> Callable[[FamilyModel, Tensor, Tensor], Tensor]:
    """decode_one_token through torch.compile, built once per device type (shared by every
    DecodeBatch, so a second batch of the same shapes reuses the compiled code).

    Static shapes: a new batch size or cache length compiles once more. fullgraph: a graph break is
    an error, not a silent slowdown; False for a model with modules that run eagerly inside a
    compiled graph (`eager_under_compile`: lmforge.compress.quantize's int8-dynamic and int4
    linears, and int8-weight's off a CPU). Those
    compile a copy of the function: dynamo keeps compiled code per code object and tries the newest
    first, and a graph that breaks at the first linear guards on too little to tell models apart,
    so a whole-graph model decoded after one such would run through its broken graph (measured,
    llama 124m shape: 39 tokens/s instead of 47). On CPU, inductor's C++ wrapper: a decode step is
    a few dozen small kernels, and calling them from generated C++ instead of Python took a third
    off the compiled step of the tiny llama (benchmarks/generate_bench.py; the compile takes longer).
    """
    cpp_wrapper = device_type == "cpu"
    function = decode_one_token if fullgraph else _decode_one_token_around_eager_modules
    return torch.compile(function, fullgraph=fullgraph, dynamic=False, options={"cpp_wrapper": cpp_wrapper})


class AheadOfTimeStep:
    """A whole-graph compiled decode step called without dynamo's frame hook: dynamo's ahead-of-time
    compiled functions (`aot_compile` of a torch.compile'd function), one per set of guards (model
    classes, shapes, autocast), newest first. A batch picks the one whose guards its first step
    passes, compiling a new one where none does, and calls it for every later step without checking
    them again: every step of a batch passes the same model, tensors and shapes (see
    DecodeBatch._guards). The functions read the model's parameters and caches at each call; where
    a setting makes dynamo bake tensors into the graph (inductor's freezing, dynamo's free tensors),
    `aot_compile` drops the guards that would tell one model or cache from another, so none is used.
    Where this torch has no `aot_compile`, or it fails, the batch decodes through the compiled
    function itself. Measured, tiny llama, batch 1, 2 threads, 128 tokens, alternated in one
    process: 735.7 -> 789.9 tokens/s (a script not kept; benchmarks/RESULTS.md)."""

    def __init__(self, compiled: Callable, limit: int = 8) -> None:
        self.compiled = compiled
        self.limit = limit  # as dynamo's recompile limit: at most this many kept
        self.functions: list[Callable] = []
        self.available = hasattr(compiled, "aot_compile")
        self._lock = threading.Lock()  # one search-and-compile at a time (aot_compile takes no lock)

    def function_for(self, model: FamilyModel, tokens: Tensor, pos: Tensor) -> Callable | None:
        """The compiled function for these arguments (guards checked here, in the caller's grad and
        autocast state), compiled now if none fits; None where ahead-of-time functions are not used."""
        if _bakes_tensors():
            return None
        with self._lock:
            for function in self.functions:
                if function.guard_check(model, tokens, pos):  # type: ignore[attr-defined]
                    return function
            if not self.available:
                return None
            try:
                function = self.compiled.aot_compile(((model, tokens, pos), {}))  # type: ignore[attr-defined]
            except Exception as err:  # not this torch's API in this form, or not for this model
                self.available = False
                warnings.warn(
                    f"compiled decoding goes through dynamo's frame hook from now on: its ahead-of-time"
                    f" compilation failed ({type(err).__name__}: {err})",
                    stacklevel=3,
                )  # fmt: skip
                return None
            function.disable_guard_check()
            self.functions = [function, *self.functions][: self.limit]
            return function


def _bakes_tensors() -> bool:
    """Settings under which dynamo makes tensors (weights, caches) constants of the graph."""
    return bool(
        torch._inductor.config.freezing
        or getattr(torch._dynamo.config, "prepare_freezing", False)
        or getattr(torch._dynamo.config, "install_free_tensors", False)
    )


@functools.cache
def ahead_of_time_step(device_type: str) -> AheadOfTimeStep | None:
    """The whole-graph decode step of compiled_decode_one_token without dynamo's call overhead, on a
    CPU (where a step is short enough for it to count); None elsewhere."""
    return AheadOfTimeStep(compiled_decode_one_token(device_type, True)) if device_type == "cpu" else None


# ---------------------------------------------------------------------------------------------------
# A batch of sequences in one KV cache
# ---------------------------------------------------------------------------------------------------


class DecodeBatch:
    """A KV cache of `batch_size` rows of `max_seq_len` slots on `model`, and each row's length.

    Use as a context manager: it sets the cache up and the model to eval mode on entry, and drops the
    cache and restores the model's mode on exit. With `compile`, on a model that was not training, the
    family's stacked modules read their projections as one matrix in between (lmforge.models.stacking:
    same parameters, fewer matmuls; the stacking and its undoing copy those weights twice, which a
    compiled decode of more than a few tokens repays). dtype: the autocast compute dtype of the forward
    passes (the run's: lmforge.rundir.run_precision); under bf16/fp16 the cache holds that dtype,
    so nothing is cast at each step.
    """

    def __init__(
        self,
        model: FamilyModel,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        if compile:
            # Compiled code is specialised to the cache's shape: a length rounded up to a power of two
            # lets generations of other lengths reuse it (the extra slots are masked out).
            max_seq_len = min(model.cfg.max_seq_len, 1 << (max_seq_len - 1).bit_length())
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # (B,) tokens cached
        fullgraph = not any(getattr(m, "eager_under_compile", False) for m in model.modules())
        self._decode = compiled_decode_one_token(self.device.type, fullgraph) if compile else decode_one_token
        self._whole_graph = compile and fullgraph  # see _guards
        self._ahead_of_time = ahead_of_time_step(self.device.type) if self._whole_graph else None
        self._step: Callable | None = None  # this batch's ahead-of-time function, from its first step
        self._was_training = model.training
        self._guards_checked = False  # a compiled step of this batch ran with its guards (see _guards)
        self._stacked = contextlib.ExitStack()

    def __enter__(self) -> DecodeBatch:
        self.model.eval()
        self._guards_checked = False
        self._step = None
        cache_dtype = None if self.dtype == torch.float32 else self.dtype
        self.model.setup_kv_cache(self.batch_size, self.max_seq_len, dtype=cache_dtype, device=self.device)
        if self._decode is not decode_one_token:
            if not self._was_training:  # training's samples: FSDP2 or CUDA graphs may hold the weights
                try:
                    spec = spec_of(getattr(self.model, "_orig_mod", self.model))  # a compiled model too
                    self._stacked.enter_context(stacked_weights(self.model, spec.stacked_modules))
                except BaseException:
                    self.__exit__()
                    raise
            for cache in kv_caches(self.model):
                # Buffers updated in place at fixed addresses: compiled code (and CUDA graphs) may
                # bake the addresses in instead of treating them as new inputs each step.
                torch._dynamo.mark_static_address(cache.k_cache)
                torch._dynamo.mark_static_address(cache.v_cache)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stacked.close()
        self.model.clear_kv_cache()
        self.model.train(self._was_training)

    @torch.no_grad()
    def prefill_row(self, row: int, prompt_ids: list[int]) -> Tensor:
        """Run `prompt_ids` into row `row` (whatever it held before) → logits of its last token (1, V).

        The other rows keep their cache and lengths: a new sequence can start between decode steps.
        """
        self.lengths[row] = 0
        return self.extend_row(row, prompt_ids)[-1:]

    @torch.no_grad()
    def extend_row(self, row: int, token_ids: list[int]) -> Tensor:
        """Feed `token_ids` to row `row` at its next positions, in one forward → their logits (T, V).

        A prompt in chunks, or the tokens a speculative step verifies (lmforge.infer.speculative).
        """
        start = int(self.lengths[row])  # a sync, once per call: the positions are needed here
        if not token_ids or start + len(token_ids) > self.max_seq_len:
            raise ValueError(
                f"{len(token_ids)} tokens after {start} do not fit a cache of {self.max_seq_len} positions"
            )
        tokens = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # (1, T)
        input_pos = torch.arange(start, start + len(token_ids), device=self.device)  # (T,)
        with writing_row(self.model, row), autocast(self.device, self.dtype):
            logits = self.model(tokens, input_pos=input_pos)[0]  # (T, V)
        self.lengths[row] = start + len(token_ids)
        return logits

    def rewind_row(self, row: int, length: int) -> None:
        """Keep only the first `length` positions of row `row` (the slots after it are masked out and
        overwritten by the next tokens): the rollback of rejected speculative tokens."""
        self.lengths[row] = length

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, active: Tensor | None = None) -> Tensor:
        """tokens (B, 1), one per row, each at its row's next position → logits (B, V).

        active (B,) bool: rows whose length advances; the others (finished, or free slots) are
        computed along (the batch keeps its shape) but stay where they are and their logits are
        meaningless. Positions past the cache's end are clamped there, so a full row only rewrites
        its last slot.
        """
        positions = self.lengths.clamp(max=self.max_seq_len - 1)  # (B,)
        with autocast(self.device, self.dtype):
            if self._step is None and self._ahead_of_time is not None:
                self._step = self._ahead_of_time.function_for(self.model, tokens, positions)
                if self._step is None:
                    self._ahead_of_time = None  # this batch goes through dynamo's frame hook
            if self._step is not None:
                logits = self._step(self.model, tokens, positions)  # (B, V)
            else:
                with self._guards():
                    logits = self._decode(self.model, tokens, positions)  # (B, V)
        self._guards_checked = True
        self.lengths += 1 if active is None else active.long()
        return logits

    def _guards(self) -> contextlib.AbstractContextManager:
        """Dynamo checks its guards (the model's parameters, the caches, the inputs' shapes) before
        every compiled call; for a small model they are a good part of a step. Every step of one
        batch passes the same tensors in the same shapes to the same model, so after its first
        compiled step, which checked them (and compiled, if it had to), the others run only the
        guards that tell apart the compiled versions dynamo has (torch.compiler.set_stance's
        `skip_guard_eval_unsafe`: unsafe only where inputs change between calls). Only for a step
        compiled whole: a graph that breaks leaves frames that dynamo may run eagerly once they
        reach its recompile limit, and their cheap guards would not tell models apart. Only where
        the caller left dynamo's stance at its default (set_stance replaces the whole stance).
        The stance is the process's: compiled decoding is meant for one thread at a time (the
        server decodes on one). Measured, tiny llama, batch 1, 2 threads, 128 tokens: 887 -> 920
        tokens/s (a script not kept; benchmarks/RESULTS.md has the combined figure, 863 -> 905)."""
        stance = getattr(torch._dynamo.eval_frame, "_stance", None)
        default = getattr(stance, "stance", None) == "default" and not getattr(
            stance, "skip_guard_eval_unsafe", 1
        )
        if not self._whole_graph or not self._guards_checked or not default:
            return contextlib.nullcontext()
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)


# ---------------------------------------------------------------------------------------------------
# Batched generation
# ---------------------------------------------------------------------------------------------------


FinishReason = Literal["eos", "stop", "length"]


@dataclass
class Generation:
    """One prompt's new tokens (up to and including an eos, or the token that completed a stop
    string) and why it ended."""

    token_ids: list[int]
    finish_reason: FinishReason


@dataclass
class Completion(Generation):
    """A Generation with its text: decoded without the eos, cut just before a stop string."""

    text: str


def _fit_prompt(prompt_ids: list[int], max_seq_len: int, eos_id: int | None) -> list[int]:
    """The prompt's last max_seq_len - 1 tokens (room for one new token); an empty prompt starts
    from the document separator, as every training document does after the one before it."""
    return prompt_ids[-(max_seq_len - 1) :] if prompt_ids else [eos_id or 0]


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    # No seed: seed this generator from the OS, not via torch.seed(), which would also reseed (and
    # so change) the caller's global RNG stream.
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def generate_batch(
    model: FamilyModel,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_id: int | None = None,
    tokenizer: Detokenizer | None = None,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> list[list[int]]:
    """Each prompt's new token ids (eos included when generated), in the prompts' order.

    The prompts may have different lengths; greedy output equals generating each alone. Stop strings
    in `params.stop` need `tokenizer` (anything with `decode(ids) -> str`).
    """
    generations = generate_batch_detailed(
        model, prompts, params, eos_id=eos_id, tokenizer=tokenizer, dtype=dtype, compile=compile
    )
    return [g.token_ids for g in generations]


def complete_batch(
    model: FamilyModel,
    tokenizer,  # tokenizers.Tokenizer
    prompts: list[str],
    params: SamplingParams,
    *,
    eos_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> list[Completion]:
    """Each prompt's completion text (and tokens, and why it ended); eos is the tokenizer's <|eos|>."""
    eos_id = tokenizer.token_to_id("<|eos|>") if eos_id is None else eos_id
    ids = [tokenizer.encode(prompt).ids for prompt in prompts]
    generations = generate_batch_detailed(
        model, ids, params, eos_id=eos_id, tokenizer=tokenizer, dtype=dtype, compile=compile
    )
    return [completion_of(g, tokenizer.decode, params.stop, eos_id) for g in generations]


def completion_of(
    generation: Generation, decode: Callable[[list[int]], str], stop: tuple[str, ...], eos_id: int | None
) -> Completion:
    """The text of a generation: without its eos, cut just before the first stop string."""
    ids = generation.token_ids
    if generation.finish_reason == "eos" and ids and ids[-1] == eos_id:
        ids = ids[:-1]
    stream = TextStream(decode, stop)
    for token_id in ids:
        stream.push(token_id)
        if stream.stopped:
            break
    stream.finish()
    return Completion(generation.token_ids, generation.finish_reason, stream.text)


@torch.no_grad()
def generate_batch_detailed(
    model: FamilyModel,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_id: int | None = None,
    tokenizer: Detokenizer | None = None,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    check_every: int = 16,
) -> list[Generation]:
    """generate_batch with each row's finish reason. check_every: decode steps between the host's
    looks at the rows (all done? a stop string?); a row that stops is cut exactly either way."""
    if params.stop and tokenizer is None:
        raise ValueError("generate_batch: stop strings need the tokenizer (tokenizer=...)")
    if not prompts:
        return []
    device = next(model.parameters()).device
    prompts = [_fit_prompt(p, model.cfg.max_seq_len, eos_id) for p in prompts]
    n_rows = len(prompts)
    cache_len = min(model.cfg.max_seq_len, max(map(len, prompts)) + params.max_new_tokens)
    # A row's budget: max_new_tokens, or fewer where its prompt leaves less room in the context
    # (the same as generating it alone, whose cache would end at the same place).
    budgets = [min(params.max_new_tokens, cache_len - len(p)) for p in prompts]
    n_steps = max(budgets)
    budget = torch.tensor(budgets, device=device)  # (B,)
    generator = _generator(params.seed, device)
    streams = []
    if params.stop:
        assert tokenizer is not None  # checked above
        streams = [TextStream(tokenizer.decode, params.stop) for _ in prompts]

    out = torch.zeros(n_rows, n_steps, dtype=torch.long, device=device)  # (B, n_steps) the sampled tokens
    n_kept = budget.clone()  # (B,) how many of a row's tokens count; set when the row ends
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)  # (B,)
    by_eos = torch.zeros(n_rows, dtype=torch.bool, device=device)  # (B,)
    stopped_by_string: set[int] = set()

    with DecodeBatch(model, n_rows, cache_len, dtype, compile) as batch:
        logits = torch.cat([batch.prefill_row(row, p) for row, p in enumerate(prompts)])  # (B, V)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)  # (B, V) tokens in each row so far
            for row, p in enumerate(prompts):
                seen[row, p] = True
        for step in range(n_steps):
            if seen is not None:
                logits = penalize_repeats(logits, seen, params.repetition_penalty)
            token = sample(logits, params.temperature, params.top_k, params.top_p, generator, params.min_p)
            out[:, step] = token[:, 0]
            if seen is not None:
                seen.scatter_(1, token, True)
            # A row ends at its eos or its budget; all on the device, no sync.
            ends = ~done & (step + 1 >= budget)
            if eos_id is not None:
                eos = ~done & (token[:, 0] == eos_id)
                by_eos |= eos
                ends |= eos
            n_kept = torch.where(ends, step + 1, n_kept)
            done |= ends
            last = step + 1 == n_steps
            if (step + 1) % check_every == 0 or last:
                # The host looks (one sync per check_every tokens): stop strings, then whether all are done.
                if streams:
                    _find_stop_strings(streams, out[:, : step + 1], n_kept, done, stopped_by_string)
                if last or bool(done.all()):
                    break
            logits = batch.decode_step(token, active=~done)

    kept, rows = n_kept.tolist(), out.tolist()
    eos_rows = by_eos.tolist()
    generations = []
    for row in range(n_rows):
        reason: FinishReason = "stop" if row in stopped_by_string else "eos" if eos_rows[row] else "length"
        generations.append(Generation(rows[row][: kept[row]], reason))
    return generations


def _find_stop_strings(
    streams: list[TextStream], tokens: Tensor, n_kept: Tensor, done: Tensor, stopped: set[int]
) -> None:
    """Feed each row's stream the tokens it has not seen; a row whose text now holds a stop string
    ends at the token that completed it (n_kept and done are updated in place)."""
    rows, kept, finished = tokens.tolist(), n_kept.tolist(), done.tolist()
    for row, stream in enumerate(streams):
        if stream.stopped:
            continue
        # A row that already ended (eos, budget) is searched only up to where it ended.
        end = kept[row] if finished[row] else len(rows[row])
        for token_id in rows[row][stream.n_tokens : end]:
            stream.push(token_id)
            if stream.stopped:
                stopped.add(row)
                n_kept[row] = stream.n_tokens
                done[row] = True
                break


# ---------------------------------------------------------------------------------------------------
# One prompt, token by token
# ---------------------------------------------------------------------------------------------------


def generate(
    model: FamilyModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    compile: bool = False,
) -> Iterator[int]:
    """An iterator over new token ids, one at a time (stops at eos, max_new_tokens or the context length).

    dtype: the autocast compute dtype of the forward passes (the run's: lmforge.rundir.run_precision).
    Raises ConfigError at the call, not at the first token, for out-of-range sampling arguments.
    Stop strings are text: lmforge.infer.stop.TextStream cuts the text this yields.
    """
    params = SamplingParams(
        max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed=seed
    )  # checks the arguments now
    return _generate_tokens(model, prompt_ids, params, eos_id, dtype, compile)


@torch.no_grad()
def _generate_tokens(
    model: FamilyModel,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_id: int | None,
    dtype: torch.dtype,
    compile: bool,
) -> Iterator[int]:
    device = next(model.parameters()).device
    max_seq_len = model.cfg.max_seq_len
    prompt_ids = _fit_prompt(prompt_ids, max_seq_len, eos_id)
    max_new_tokens = min(params.max_new_tokens, max_seq_len - len(prompt_ids))
    generator = _generator(params.seed, device)
    # Autocast around each forward (inside DecodeBatch), not around the loop: a generator suspended
    # at `yield` would leave its caller's code running under autocast.
    with DecodeBatch(model, 1, len(prompt_ids) + max_new_tokens, dtype, compile) as batch:
        logits = batch.prefill_row(0, prompt_ids)  # (1, V)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)  # (1, V)
            seen[0, prompt_ids] = True
        for i in range(max_new_tokens):
            if seen is not None:
                logits = penalize_repeats(logits, seen, params.repetition_penalty)
            token = sample(logits, params.temperature, params.top_k, params.top_p, generator, params.min_p)
            token_id = int(token.item())  # the caller streams it: a sync per token is the point here
            yield token_id
            if token_id == eos_id or i == max_new_tokens - 1:
                break
            if seen is not None:
                seen[0, token_id] = True
            logits = batch.decode_step(token)


def complete(model: FamilyModel, tokenizer, prompt: str, max_new_tokens: int, **sampling) -> str:
    """Generated text for `prompt` (not including the prompt), stopping at eos."""
    eos_id = tokenizer.token_to_id("<|eos|>")
    ids = list(generate(model, tokenizer.encode(prompt).ids, max_new_tokens, eos_id=eos_id, **sampling))
    if ids and ids[-1] == eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)
