"""Masked-language-model inputs (BERT's objective, Devlin et al. 2019, section 3.1).

Of the positions holding a non-special token, 15% are chosen; a chosen position's input becomes the
mask token 80% of the time, a random non-special token 10% of the time, and stays as it is 10% of the
time; its target is the original token. Every other target is IGNORE_INDEX (no loss). The choice for
a row is a function of (seed, the row's index in the data stream) only, so a resumed run, or the same
rows split over more ranks, masks exactly alike.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer
from torch import Tensor

from lmforge.ops.cross_entropy import IGNORE_INDEX

MASK_TOKEN = "<|mask|>"


def add_mask_token(tokenizer: Tokenizer) -> bool:
    """Add the mask token as a special token (the next id) unless the tokenizer has it; True if added."""
    if tokenizer.token_to_id(MASK_TOKEN) is not None:
        return False
    tokenizer.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    return True


def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    return sorted(set(tokenizer.get_added_tokens_decoder()))


def mask_tokens(tokens: Tensor, row_ids: list[int], seed: int, mask_id: int, special: list[int],
                vocab: int, rate: float = 0.15) -> tuple[Tensor, Tensor]:  # fmt: skip
    """tokens (B, T) int64 -> (inputs, targets) (B, T) int64, row b masked from (seed, row_ids[b]).
    vocab: the tokenizer's size (random replacements are drawn from its non-special ids)."""
    ordinary = np.setdiff1d(np.arange(vocab), special)
    array = tokens.numpy()
    inputs, targets = array.copy(), np.full_like(array, IGNORE_INDEX)
    for b, row in enumerate(row_ids):
        rng = np.random.default_rng([seed, row])
        draw, kind = rng.random(array.shape[1]), rng.random(array.shape[1])  # (T,) each
        replacement = rng.choice(ordinary, size=array.shape[1])
        chosen = (draw < rate) & ~np.isin(array[b], special)
        targets[b, chosen] = array[b, chosen]
        inputs[b, chosen & (kind < 0.8)] = mask_id
        random = chosen & (kind >= 0.8) & (kind < 0.9)
        inputs[b, random] = replacement[random]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


class Masker:
    """Masks rows of token windows (lmforge.data.mlm) with one tokenizer's mask and special tokens."""

    def __init__(self, tokenizer: Tokenizer, seed: int):
        mask_id = tokenizer.token_to_id(MASK_TOKEN)
        if mask_id is None:
            raise ValueError(f"the tokenizer has no {MASK_TOKEN} token (lmforge.data.mlm.add_mask_token)")
        self.mask_id, self.seed = mask_id, seed
        self.special, self.vocab = special_token_ids(tokenizer), tokenizer.get_vocab_size()

    def __call__(self, tokens: Tensor, row_ids: list[int]) -> tuple[Tensor, Tensor]:
        return mask_tokens(tokens, row_ids, self.seed, self.mask_id, self.special, self.vocab)

    def batches(self, windows: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Validation (or evaluation) batches masked once: row i of them all has row id i."""
        out, row = [], 0
        for inputs, _ in windows:
            out.append(self(inputs, list(range(row, row + len(inputs)))))
            row += len(inputs)
        return out
