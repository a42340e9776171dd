"""Packed sequences: several documents in one row, none attending to another.

A row of `doc_ids` (B, T) names the document of each position (consecutive positions of one
document share an id; any ids, e.g. 0, 0, 0, 1, 1, 2, ...). A model given doc_ids restarts positions
at each document (RoPE angles, learned positions) and masks attention to causal-within-document, so
every packed example gets exactly the logits it gets alone (tests/models/test_packing.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


def document_positions(doc_ids: Tensor) -> Tensor:
    """(B, T) -> (B, T) int64: each position's offset from the start of its document."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, T) a document starts here
    start_index = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T) its document's start
    return index - start_index


def document_mask(doc_ids: Tensor) -> Tensor:
    """(B, T) -> (B, 1, T, T) bool attention mask: query i sees key j iff j <= i in the same document."""
    T = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]
