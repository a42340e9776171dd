"""Continuous batching: one decode loop over a fixed set of KV-cache rows, shared by every request.

The engine owns the model and a `DecodeBatch` of `max_batch` rows (slots) and runs in one
background thread. Requests arrive on a waiting list from the HTTP server's event loop. Each turn
of the loop:

1. admits waiting requests into free slots: `prefill_row` runs the prompt into that row of the
   cache while the other rows keep theirs, and gives the logits of its first new token;
2. picks every busy row's next token with the row's own sampling settings (greedy rows together
   in one argmax, the others one `sample` call each, with their own seeded generator);
3. hands each row's token to its request: the text it adds (`TextStream`: whole characters, stop
   strings cut exactly) goes to the request's asyncio queue; a row that ends (its end token, a
   stop string, max_tokens, the context is full) frees its slot;
4. runs one `decode_step` over all rows, with an `active` mask: the rows that go on advance one
   position, free rows are computed along (the batch keeps its shape) and change nothing.

A request that joins waits at most one step; a finished one leaves at once, so the batch stays
full under load instead of waiting for its longest member (static batching). Each row attends
only to its own cache slots at its own positions, so a greedy request gets the tokens it would
get alone. A client that goes away cancels its request: its slot is freed at the next step.

The host reads the sampled tokens once per step (`tolist`): every client is waiting for its
token, so this sync is the point of the step, not an accident.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lmforge.infer.generate import DecodeBatch
from lmforge.infer.sampling import SamplingParams, penalize_repeats, sample
from lmforge.infer.stop import TextStream
from lmforge.models import FamilyModel

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: the prompt's token ids, how to sample, and which tokens end the text.

    params.max_new_tokens is the client's max_tokens; the engine cuts it to the room the context
    leaves after the prompt (as generating alone does).
    """

    prompt_ids: list[int]
    params: SamplingParams
    end_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Event:
    """News for one request: new text (may be ""), the tokens generated so far, and on the last
    event why it ended (an error's message in `error`)."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None


class RequestHandle:
    """The event loop's side of a submitted request: its events, in order, and a way to cancel it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()
        self.finished = False  # set on the event loop when the last event is read

    def cancel(self) -> None:
        """The client is gone: the engine frees the request's slot (or drops it from the waiting
        list) at its next step. Safe from any thread, and after the request ended."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, event: Event) -> None:
        """From the engine thread: queue `event` on the request's event loop."""
        with contextlib.suppress(RuntimeError):  # the loop closed (server shutting down): nobody listens
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Slot:
    """A busy row of the batch: its request and the state its sampling needs."""

    handle: RequestHandle
    stream: TextStream
    budget: int  # tokens it may generate: max_tokens, or less where the context ends first
    generator: torch.Generator | None  # None for greedy rows
    seen: Tensor | None  # (V,) bool: tokens in the prompt or the output (repetition penalty)
    n_generated: int = 0


@dataclass
class EngineStats:
    """Counters for /health (read from another thread: plain ints, written by the engine only)."""

    admitted: int = 0
    completion_tokens: int = 0
    steps: int = 0
    finished: dict[str, int] = field(
        default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
    )


class Engine:
    """The decode loop of `max_batch` slots over `model`, in a background thread.

    `start()` (blocks until the loop is ready: the cache allocated and one step warmed up, which
    with compile=True is where the compilation happens), `submit()` from an event loop, `stop()`.
    decode: the tokenizer's `decode(ids) -> str`.
    """

    def __init__(
        self,
        model: FamilyModel,
        decode: Callable[[list[int]], str],
        max_batch: int = 16,
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.decode = decode
        self.max_batch = max_batch
        self.max_seq_len: int = model.cfg.max_seq_len
        self.dtype = dtype
        self.compile = compile
        self.stats = EngineStats()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._wake = threading.Condition()
        self._slots: list[_Slot | None] = [None] * max_batch
        self._stopping = False
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)

    # ------------------------------------------------------------------------------ the server's side

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise RuntimeError("the decode loop failed to start") from self._failure

    def stop(self) -> None:
        """Ends the loop; requests still waiting or running get an error event."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request (call from the event loop that reads its events). Its prompt must leave
        room for one new token: len(prompt_ids) < max_seq_len (the server checks before)."""
        if not 0 < len(request.prompt_ids) < self.max_seq_len:
            raise ValueError(
                f"a prompt of {len(request.prompt_ids)} tokens in a context of {self.max_seq_len}"
            )
        handle = RequestHandle(request, asyncio.get_running_loop())
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    @property
    def n_active(self) -> int:
        return sum(slot is not None for slot in self._slots)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            with torch.no_grad(), DecodeBatch(self.model, self.max_batch, self.max_seq_len, self.dtype,
                                              self.compile) as batch:  # fmt: skip
                logits = self._warm_up(batch)  # (B, V): each busy row's next-token logits, from here on
                self._ready.set()
                while self._next_turn():
                    try:
                        logits = self._admit(batch, logits)
                        if self.n_active:
                            logits = self._step(batch, logits)
                    except Exception as err:  # a bug or an out-of-memory: fail the rows, keep serving
                        log.exception("decode step failed")
                        self._fail_all(f"generation failed: {type(err).__name__}: {err}")
                self._fail_all("the server is shutting down")
        except BaseException as err:
            self._failure = err
            self._ready.set()
            raise

    def _warm_up(self, batch: DecodeBatch) -> Tensor:
        """One prefill and one decode step on throwaway tokens → logits (B, V) (meaningless): first-call
        costs (and with compile, the compilation) are paid before the first request, not by it."""
        batch.prefill_row(0, [0])
        return batch.decode_step(torch.zeros(self.max_batch, 1, dtype=torch.long, device=batch.device))

    def _next_turn(self) -> bool:
        """Wait while there is nothing to do; False once the engine is stopping."""
        with self._wake:
            while not self._stopping and not self._waiting and not self.n_active:
                self._wake.wait()
            return not self._stopping

    def _admit(self, batch: DecodeBatch, logits: Tensor) -> Tensor:
        """Prefill waiting requests into free slots (first come, first served) → the logits (B, V)."""
        while True:
            free = [row for row, slot in enumerate(self._slots) if slot is None]
            with self._wake:
                if not free or not self._waiting:
                    return logits
                handle = self._waiting.popleft()
            if handle.cancelled:  # gone while it waited
                self._finish(handle, "cancelled", "", 0)
                continue
            row = free[0]
            logits[row] = batch.prefill_row(row, handle.request.prompt_ids)[0]  # (V,)
            self._slots[row] = self._new_slot(handle, logits.size(-1), batch.device)
            self.stats.admitted += 1

    def _new_slot(self, handle: RequestHandle, vocab: int, device: torch.device) -> _Slot:
        request = handle.request
        params = request.params
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device)
            if params.seed is None:
                generator.seed()  # from the OS
            else:
                generator.manual_seed(params.seed)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[request.prompt_ids] = True
        budget = min(params.max_new_tokens, self.max_seq_len - len(request.prompt_ids))
        return _Slot(handle, TextStream(self.decode, params.stop), budget, generator, seen)

    def _step(self, batch: DecodeBatch, logits: Tensor) -> Tensor:
        """Sample a token for every busy row, hand it over, then one decode step → next logits (B, V)."""
        for row, slot in enumerate(self._slots):
            if slot is not None and slot.handle.cancelled:
                self._free(row, "cancelled", "")
        rows = [row for row, slot in enumerate(self._slots) if slot is not None]
        if not rows:
            return logits
        tokens = self._sample(logits, rows)  # (B,)
        token_ids = tokens.tolist()  # the step's one sync: every client waits for its token
        going = [False] * self.max_batch
        for row in rows:
            going[row] = self._hand_over(row, token_ids[row])
        self.stats.steps += 1
        if not any(going):
            return logits
        active = torch.tensor(going, device=batch.device)  # (B,)
        return batch.decode_step(tokens[:, None], active=active)  # (B, V)

    def _sample(self, logits: Tensor, rows: list[int]) -> Tensor:
        """Each busy row's next token under its own settings → (B,) (free rows: whatever argmax says)."""
        for row in rows:
            slot = self._slots[row]
            assert slot is not None
            if slot.seen is not None:
                penalty = slot.handle.request.params.repetition_penalty
                logits[row] = penalize_repeats(logits[row : row + 1], slot.seen[None], penalty)[0]
        tokens = logits.argmax(dim=-1)  # (B,) the greedy rows' tokens, all at once
        for row in rows:
            slot = self._slots[row]
            assert slot is not None
            if slot.generator is not None:
                p = slot.handle.request.params
                picked = sample(
                    logits[row : row + 1], p.temperature, p.top_k, p.top_p, slot.generator, p.min_p
                )
                tokens[row] = picked[0, 0]
        return tokens

    def _hand_over(self, row: int, token_id: int) -> bool:
        """Give row `row`'s new token to its request; True if the row goes on."""
        slot = self._slots[row]
        assert slot is not None
        slot.n_generated += 1
        self.stats.completion_tokens += 1
        request = slot.handle.request
        if token_id in request.end_ids:
            self._free(row, "stop", slot.stream.finish())
            return False
        text = slot.stream.push(token_id)
        if slot.stream.stopped:
            self._free(row, "stop", text)
            return False
        if slot.n_generated >= slot.budget:
            self._free(row, "length", text + slot.stream.finish())
            return False
        if slot.seen is not None:
            slot.seen[token_id] = True
        if text:
            slot.handle.push(Event(text, slot.n_generated))
        return True

    def _free(self, row: int, reason: FinishReason, text: str, error: str | None = None) -> None:
        slot = self._slots[row]
        assert slot is not None
        self._slots[row] = None  # the next _admit may prefill a new request here
        self._finish(slot.handle, reason, text, slot.n_generated, error)

    def _finish(
        self, handle: RequestHandle, reason: FinishReason, text: str, n_tokens: int, error: str | None = None
    ) -> None:
        self.stats.finished[reason] += 1
        handle.push(Event(text, n_tokens, reason, error))  # (a cancelled one: ends a wait, if any)

    def _fail_all(self, message: str) -> None:
        for row, slot in enumerate(self._slots):
            if slot is not None:
                self._free(row, "error", "", message)
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting:
            self._finish(handle, "error", "", 0, message)
