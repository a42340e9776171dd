"""Key/value cache for autoregressive decoding, shared by every model family.

During generation each new token attends to the keys and values of all earlier tokens. Recomputing
them every step costs O(T^2) per sequence; caching them makes a decode step O(T). The buffers are
preallocated once at their maximum length (as in gpt-fast) so that every decode step has the same
tensor shapes: no reallocation, and `torch.compile` does not recompile as the sequence grows.

Each row of the cache is its own sequence, at its own positions: row b's token at position p is
written to slot p of row b, and a query at position p sees slots 0..p of its row. Rows of different
lengths therefore share one batch without padding inside the cache (prompts are right-padded for a
batched prefill; the pad positions' slots are overwritten by the row's next tokens before any query
can see them), and a row can be reset and refilled while the others decode (continuous batching:
`writing_row` below, lmforge.infer.generate.DecodeBatch.prefill_row).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer.

    Holds `n_kv_heads` heads, not `n_heads`: with grouped-query attention the cache is where the
    memory saving of having fewer key/value heads is actually realised.

    The buffers are non-persistent: a cache is inference state, never part of a checkpoint.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        for name, value in [
            ("batch_size", batch_size),
            ("n_kv_heads", n_kv_heads),
            ("max_seq_len", max_seq_len),
            ("head_dim", head_dim),
        ]:
            if value <= 0:
                raise ValueError(f"KVCache {name} must be positive, got {value}")
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.k_cache: Tensor  # (B, n_kv_heads, max_seq_len, head_dim)
        self.v_cache: Tensor  # (B, n_kv_heads, max_seq_len, head_dim)
        # While set (by `writing_row`), a forward of batch 1 reads and writes this row only: how one
        # sequence is prefilled into a free row while the other rows keep their state.
        self.row: int | None = None

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.size(2)

    @property
    def batch_size(self) -> int:
        return self.k_cache.size(0)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write `k`, `v` at positions `input_pos` and return the whole cache.

        input_pos: (T,) long, the same absolute positions for every row, or (B, T), each row its own.
        k, v: (B, n_kv_heads, T, head_dim), cast to the cache's dtype when they differ (e.g. bf16
        activations under autocast written into an fp32 cache).
        Returns the full buffers (B, n_kv_heads, max_seq_len, head_dim) (with `row` set, that row's
        (1, ...) view); slots not written yet hold zeros or stale values, so the caller must mask
        them out (see `causal_mask`).
        """
        k_cache, v_cache = self.k_cache, self.v_cache
        if self.row is not None:
            # A view of one row: the in-place writes below land in the shared buffers.
            k_cache, v_cache = k_cache[self.row : self.row + 1], v_cache[self.row : self.row + 1]
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        if input_pos.ndim == 1:
            # index_copy_ writes in place along the sequence dim; shapes stay static for compile.
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
        else:
            # Row b's token t goes to slot input_pos[b, t] of row b. The two index tensors are split
            # by the heads slice, so the indexed result is laid out (B, T, n_kv_heads, head_dim).
            rows = torch.arange(k.size(0), device=input_pos.device)[:, None]  # (B, 1)
            k_cache[rows, :, input_pos] = k.transpose(1, 2)
            v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return k_cache, v_cache

    def causal_mask(self, input_pos: Tensor, n_rep: int = 1) -> Tensor:
        """Boolean attention mask: True where the query may attend.

        input_pos (T,) -> (n_rep * T, max_seq_len); (B, T) -> (B, 1, n_rep * T, max_seq_len),
        broadcast over heads. A query at absolute position p sees cache slots 0..p of its row. This
        both enforces causality within a prefill chunk and hides the slots not written yet (or left
        from a longer past). n_rep > 1: the rows repeat n_rep times, for queries of n_rep heads that
        share one key/value head laid out as n_rep * T rows (head-major).
        """
        cache_positions = torch.arange(self.max_seq_len, device=input_pos.device)  # (max_seq_len,)
        mask = input_pos[..., None] >= cache_positions  # ([B,] T, max_seq_len)
        if n_rep > 1:
            mask = mask.repeat(*([1] * (mask.ndim - 2)), n_rep, 1)  # ([B,] n_rep * T, max_seq_len)
        return mask if input_pos.ndim == 1 else mask[:, None]


def attend_cache(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of queries over a cache: q (B, H, Tq, d), k and v (B, H, S, d), mask (Tq, S) or
    (B, 1, Tq, S), True where a query may attend -> (B, H, Tq, d). Inside a compiled step on a CPU
    it is written out (scores, masked softmax, weighted sum), which inductor fuses into a few loops
    beside the surrounding ops, in place of PyTorch's CPU flash-attention kernel (measured, tiny
    llama, batch 1, 2 threads, compiled decoding: 866 -> 935 tokens/s, a script not kept;
    benchmarks/RESULTS.md has the combined figure); for a decode step's few queries, without
    matmul calls (708 -> 737, alternated, a script not kept). Every query sees at least its own slot, so no
    row of the softmax is all masked."""
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        assert mask.dtype == torch.bool, "attend_cache takes a boolean mask (KVCache.causal_mask)"
        if q.size(-2) > 8:
            scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, H, Tq, S)
            return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
        # A decode step's few queries: products and sums that inductor fuses with the softmax, in
        # place of two batched matmul calls per layer that cost more to call than to compute.
        scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * q.size(-1) ** -0.5  # (B, H, Tq, S)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (B, H, Tq, S)
        return (weights.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)  # (B, H, Tq, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def local_heads(projection: nn.Linear, heads: int) -> int:
    """How many of a layer's `heads` this process computes: all of them, or on a tensor-parallel
    shard (a DTensor weight split by output rows = by whole heads, lmforge.parallel.tensor) the share
    its local rows hold. The KV cache of a shard holds only its own heads."""
    weight = projection.weight
    local = weight.to_local() if isinstance(weight, DTensor) else weight  # a DTensor's shard
    return heads * local.shape[0] // weight.shape[0]


def kv_caches(model: nn.Module) -> list[KVCache]:
    """Every KV cache a model's attention layers hold (none before `setup_kv_cache`)."""
    return [module for module in model.modules() if isinstance(module, KVCache)]


@contextlib.contextmanager
def writing_row(model: nn.Module, row: int) -> Iterator[None]:
    """Within the block, a forward of one sequence (batch 1) reads and writes row `row` of every KV
    cache of `model`, and leaves the other rows as they are."""
    caches = kv_caches(model)
    if not caches:
        raise ValueError("writing_row: the model has no KV cache (call setup_kv_cache first)")
    if not 0 <= row < caches[0].batch_size:
        raise ValueError(f"writing_row: row {row} is outside the cache's {caches[0].batch_size} rows")
    for cache in caches:
        cache.row = row
    try:
        yield
    finally:
        for cache in caches:
            cache.row = None
