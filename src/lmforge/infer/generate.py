"""Autoregressive generation with a KV cache, as small phase functions.

prefill runs the whole prompt once and fills every layer's KV cache; decode_one_token then feeds
one token at a time, attending over the cache instead of recomputing the prefix, so each new token
costs one position's worth of compute instead of the whole sequence's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.errors import ConfigError
from lmforge.models import FamilyModel
from lmforge.runtime import autocast


def check_sampling_args(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
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


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
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
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def prefill(model: FamilyModel, prompt: torch.Tensor) -> torch.Tensor:
    """prompt (B, T) → logits of the last position (B, V); fills the KV cache for positions 0..T-1."""
    input_pos = torch.arange(prompt.size(1), device=prompt.device)
    return model(prompt, input_pos=input_pos)[:, -1, :]


def decode_one_token(model: FamilyModel, token: torch.Tensor, pos: int) -> torch.Tensor:
    """token (B, 1) at absolute position `pos` → logits (B, V)."""
    input_pos = torch.tensor([pos], device=token.device)
    return model(token, input_pos=input_pos)[:, -1, :]


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
) -> Iterator[int]:
    """An iterator over new token ids, one at a time (stops at eos, max_new_tokens or the context length).

    dtype: the autocast compute dtype of the forward passes (the run's: lmforge.rundir.run_precision).
    Raises ConfigError at the call, not at the first token, for out-of-range sampling arguments.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    return _generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id, dtype)


@torch.no_grad()
def _generate_tokens(
    model: FamilyModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    eos_id: int | None,
    dtype: torch.dtype,
) -> Iterator[int]:
    device = next(model.parameters()).device
    max_seq_len = model.cfg.max_seq_len
    prompt_ids = prompt_ids[-(max_seq_len - 1) :] if prompt_ids else [eos_id or 0]
    max_new_tokens = min(max_new_tokens, max_seq_len - len(prompt_ids))
    if max_new_tokens <= 0:
        return
    generator = torch.Generator(device=device)
    # No seed: seed this generator from the OS, not via torch.seed(), which would also reseed (and
    # so change) the caller's global RNG stream.
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    # Under autocast the cache holds what attention reads (bf16/fp16): nothing is cast each step.
    cache_dtype = None if dtype == torch.float32 else dtype
    model.setup_kv_cache(
        batch_size=1, max_seq_len=len(prompt_ids) + max_new_tokens, dtype=cache_dtype, device=device
    )
    try:
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        # Autocast around each forward, not around the loop: a generator suspended at `yield` would
        # leave its caller's code running under autocast.
        with autocast(device, dtype):
            logits = prefill(model, prompt)
        pos = len(prompt_ids)
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            token_id = int(token.item())
            yield token_id
            if token_id == eos_id or i == max_new_tokens - 1:
                break
            with autocast(device, dtype):
                logits = decode_one_token(model, token, pos)
            pos += 1
    finally:
        model.clear_kv_cache()
        model.train(was_training)


def complete(model: FamilyModel, tokenizer, prompt: str, max_new_tokens: int, **sampling) -> str:
    """Generated text for `prompt` (not including the prompt), stopping at eos."""
    eos_id = tokenizer.token_to_id("<|eos|>")
    ids = list(generate(model, tokenizer.encode(prompt).ids, max_new_tokens, eos_id=eos_id, **sampling))
    if ids and ids[-1] == eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)
