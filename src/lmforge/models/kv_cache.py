"""Key/value cache for autoregressive decoding, shared by every model family.

During generation each new token attends to the keys and values of all earlier tokens. Recomputing
them every step costs O(T^2) per sequence; caching them makes a decode step O(T). The buffers are
preallocated once at their maximum length (as in gpt-fast) so that every decode step has the same
tensor shapes: no reallocation, and `torch.compile` does not recompile as the sequence grows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.size(2)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write `k`, `v` at positions `input_pos` and return the whole cache.

        input_pos: (T,) long, absolute positions of the new tokens.
        k, v: (B, n_kv_heads, T, head_dim), cast to the cache's dtype when they differ (e.g. bf16
        activations under autocast written into an fp32 cache).
        Returns the full buffers (B, n_kv_heads, max_seq_len, head_dim); slots not written yet hold
        zeros, so the caller must mask them out (see `causal_mask`).
        """
        # index_copy_ writes in place along the sequence dim; shapes stay static for compile.
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache

    def causal_mask(self, input_pos: Tensor) -> Tensor:
        """Boolean attention mask (T, max_seq_len): True where the query may attend.

        A query at absolute position p sees cache slots 0..p. This both enforces causality within a
        prefill chunk and hides the not-yet-written (zero) slots beyond the current position.
        """
        cache_positions = torch.arange(self.max_seq_len, device=input_pos.device)  # (max_seq_len,)
        return input_pos[:, None] >= cache_positions[None, :]  # (T, max_seq_len)
