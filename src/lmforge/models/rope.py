"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary
Position Embedding"): each pair of a query's or key's features is rotated by an angle proportional
to its position, so a query-key dot product depends on their distance and not on where they are.
Used by the llama family and, with `positions: rotary`, by the BERT-style encoder."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (max_seq_len, head_dim // 2), always fp32.

    Pair i of a head is rotated by angle position * theta^(-2i / head_dim). Computed in fp32 because
    in bf16 the angles at large positions are off by whole radians.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    positions = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim // 2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of every head by its position's angle.

    x: (B, T, n_heads, head_dim); cos, sin: (T, head_dim // 2), or (B, T, head_dim // 2) when each
    row has its own positions (packed documents), fp32. Returns x's shape and dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, n_heads, head_dim // 2, 2)
    x_even, x_odd = pairs[..., 0], pairs[..., 1]  # (B, T, n_heads, head_dim // 2) each
    if cos.ndim == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, head_dim // 2)
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, head_dim // 2)
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)  # (B, T, n_heads, head_dim)
