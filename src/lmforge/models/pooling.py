"""One vector per sequence from a model's last hidden states, for a classification head: the first
position or the mean of the real tokens (an encoder's, where every position sees the whole
sequence), or the last real token (a decoder's, the only position that has seen every token; rows
are right-padded)."""

from __future__ import annotations

import torch
from torch import Tensor


def first_token(hidden: Tensor) -> Tensor:
    """(B, T, D) -> (B, D)."""
    return hidden[:, 0]


def last_token(hidden: Tensor, pad_mask: Tensor | None) -> Tensor:
    """(B, T, D) -> (B, D): the last position where pad_mask (B, T) is True, or the last position."""
    if pad_mask is None:
        return hidden[:, -1]
    last = pad_mask.long().sum(dim=1).clamp(min=1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_of_tokens(hidden: Tensor, pad_mask: Tensor | None) -> Tensor:
    """(B, T, D) -> (B, D): the mean over the positions where pad_mask (B, T) is True, or over all."""
    if pad_mask is None:
        return hidden.mean(dim=1)
    weights = pad_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    count = pad_mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1) int: exact, whatever the dtype
    return (hidden * weights).sum(dim=1) / count.to(hidden.dtype)
