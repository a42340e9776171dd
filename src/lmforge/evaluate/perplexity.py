"""Validation loss and perplexity, the unigram entropy a model must beat, and bits per byte (a loss
that compares across tokenizers)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, pre_tokenizers
from torch import nn

from lmforge.ops.cross_entropy import IGNORE_INDEX, cross_entropy
from lmforge.runtime import autocast


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Mean next-token cross-entropy (nats/token) over `batches` (targets of IGNORE_INDEX left out),
    and its perplexity."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    total_tokens = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, dtype):
            logits = model(inputs)
        counted = int((targets != IGNORE_INDEX).sum())  # the targets that have a loss
        if counted:
            total_loss += (cross_entropy(logits, targets) * counted).double()  # the batch's summed loss
        total_tokens += counted
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no validation batches")
    val_loss = total_loss.item() / total_tokens  # one host sync per evaluation
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "val_tokens": total_tokens}


def unigram_entropy(shards: Iterable[Path], dtype: str, vocab_size: int) -> float:
    """Entropy (nats/token) of the corpus's token frequencies: the loss of the best model that
    ignores context. A language model that learned anything beats it clearly."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in shards:
        tokens = np.memmap(shard, dtype=dtype, mode="r")
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """The number of bytes of text each token id stands for, for a byte-level BPE tokenizer (each
    character of a token's string is one byte there); 0 for special tokens such as <|eos|>."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = set(tokenizer.get_added_tokens_decoder())
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        if not set(token) <= alphabet:
            raise ValueError(f"token {index} ({token!r}) is not byte-level BPE: bytes per token are unknown")
        lengths[index] = len(token)
    return lengths


def bits_per_byte(val_loss: float, targets: Iterable[torch.Tensor], byte_lengths: np.ndarray) -> float:
    """A mean loss in nats/token over `targets` as bits per byte of the text they encode: comparable
    across tokenizers, since a smaller vocabulary lowers the loss per token without a better model."""
    n_tokens = n_bytes = 0
    for target in targets:
        n_tokens += target.numel()
        n_bytes += int(byte_lengths[target.numpy()].sum())
    return val_loss * n_tokens / (n_bytes * math.log(2))
