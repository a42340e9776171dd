"""Choosing the next token from logits: the sampling settings, their checks, and `sample`.

The order of the filters is Hugging Face's (its logits processors, then its warpers): the
repetition penalty on the raw logits, then temperature, top-k, top-p, min-p. Greedy decoding
(temperature 0) is the argmax of the penalised logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError


def check_sampling_args(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: tuple[str, ...] | list[str] = (),
) -> None:
    """ConfigError naming the flag and its value if a sampling argument is out of range.

    The CLI calls this before loading a model, so a typo costs nothing; `generate` calls it too.
    Comparisons are written so that NaN fails them.
    """
    if not max_new_tokens > 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and not top_k >= 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ConfigError(f"--min-p must be in [0, 1], got {min_p}")
    if not 0 < repetition_penalty < math.inf:
        raise ConfigError(f"--repetition-penalty must be > 0 (1 is off), got {repetition_penalty}")
    for text in stop:
        if not text:
            raise ConfigError("--stop strings must not be empty, got ''")


@dataclass(frozen=True)
class SamplingParams:
    """How `generate_batch` picks tokens and when a row stops (checked when built).

    max_new_tokens: tokens generated at most per prompt (fewer where the model's context ends).
    temperature: 0 is greedy; otherwise logits are divided by it before softmax.
    top_k, top_p, min_p: sample only among the k most likely tokens / the smallest set covering
    probability top_p / tokens at least min_p times as likely as the most likely one (None: off).
    repetition_penalty: > 1 makes every token already in the prompt or the output less likely
    (Keskar et al. 2019, "CTRL", section 4.1: a positive logit is divided by it, a negative one
    multiplied); 1 is off.
    stop: strings that end a row; the text is cut just before the first one (needs the tokenizer).
    seed: seed of the sampling generator (None: from the OS).
    """

    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # a list given by a caller works too
        check_sampling_args(
            self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.min_p,
            self.repetition_penalty, self.stop,
        )  # fmt: skip

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """logits (B, V) → next token ids (B, 1). temperature 0 is greedy; top_p 1.0 keeps every token."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first is always kept.
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None and min_p > 0.0:
        # p >= min_p * p_max  <=>  logit >= logit_max + log(min_p): no softmax needed, and the
        # ratio is the same before and after the filters above renormalise.
        floor = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V), seen (B, V) bool (tokens already in the row) → penalised logits (B, V).

    A seen token's positive logit is divided by `penalty`, a negative one multiplied by it, so that
    with penalty > 1 it always becomes less likely (CTRL's rule, as Hugging Face applies it).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)
