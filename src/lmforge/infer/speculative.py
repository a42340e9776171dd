"""Speculative decoding with a smaller draft model: the target's greedy output, in fewer target steps.

Decoding one token reads every weight of the model once, so a large model's decode step costs about
the same for one token as for a few. A small draft model (same tokenizer) proposes k tokens one by
one; the target checks all of them in one forward over k + 1 positions; the longest prefix on which
the target's own greedy choice agrees is kept, plus the target's next token after it (its correction,
or a bonus token when all k agree). Every kept token is one the target would have chosen greedily,
so the output is exactly the target's greedy output; what the draft buys is how many tokens each
target forward yields (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling").

Rejected tokens are rolled back by moving the caches' lengths back (DecodeBatch.rewind_row): their
slots are masked out and overwritten by the next tokens, nothing is copied.

The invariant of the loop: each model's cache holds the sequence except its last token, which is
fed next; for the draft, the tokens it has not seen yet wait in `pending`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError
from lmforge.infer.generate import DecodeBatch, _fit_prompt
from lmforge.models import FamilyModel


@dataclass
class SpeculativeStats:
    """What a speculative generation did; filled in as it runs."""

    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, the ones the target agreed with
    target_forwards: int = 0  # target forwards after the prefill (each yields 1 to k + 1 tokens)
    new_tokens: int = 0  # tokens yielded

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when none was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0


def check_draft(target: FamilyModel, draft: FamilyModel, draft_tokens: int) -> None:
    """ConfigError if the draft cannot propose tokens for the target."""
    if not draft_tokens >= 1:
        raise ConfigError(f"--draft-tokens must be >= 1, got {draft_tokens}")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ConfigError(
            f"the draft model's vocabulary ({draft.cfg.vocab_size} tokens) is not the target's "
            f"({target.cfg.vocab_size}): speculative decoding needs the same tokenizer"
        )


def speculative_generate(
    target: FamilyModel,
    draft: FamilyModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    draft_tokens: int = 4,
    eos_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    stats: SpeculativeStats | None = None,
    compile: bool = False,
) -> Iterator[int]:
    """The target's greedy tokens after `prompt_ids`, one at a time (as `generate` with temperature 0
    yields them), computed with `draft_tokens` draft proposals per target forward.

    stats: filled in as tokens come (the acceptance rate, tokens per target forward).
    compile: the draft's decode steps through torch.compile (the target's forwards over k + 1 tokens
    stay eager: k changes near the end, and each shape would compile anew).
    Raises ConfigError at the call for a draft of another vocabulary or draft_tokens < 1.
    """
    check_draft(target, draft, draft_tokens)
    if not max_new_tokens > 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    return _speculative_tokens(
        target,
        draft,
        prompt_ids,
        max_new_tokens,
        draft_tokens,
        eos_id,
        dtype,
        stats or SpeculativeStats(),
        compile,
    )


@torch.no_grad()
def _speculative_tokens(
    target: FamilyModel,
    draft: FamilyModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    draft_tokens: int,
    eos_id: int | None,
    dtype: torch.dtype,
    stats: SpeculativeStats,
    compile: bool,
) -> Iterator[int]:
    context = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    prompt_ids = _fit_prompt(prompt_ids, context, eos_id)
    max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    cache_len = len(prompt_ids) + max_new_tokens
    with (
        DecodeBatch(target, 1, cache_len, dtype) as target_cache,
        DecodeBatch(draft, 1, cache_len, dtype, compile) as draft_cache,
    ):
        last = int(target_cache.prefill_row(0, prompt_ids).argmax())  # the first token is the target's
        draft_cache.prefill_row(0, prompt_ids)
        pending = [last]  # tokens the draft has not been fed yet
        emitted = 0
        while True:
            stats.new_tokens += 1
            emitted += 1
            yield last
            if last == eos_id or emitted == max_new_tokens:
                return
            position = len(prompt_ids) + emitted - 1  # of `last`, the target's next input
            # Room for k proposals and the target's token after them within max_new_tokens.
            k = min(draft_tokens, max_new_tokens - emitted - 1)
            proposals = []
            if k > 0:
                logits = draft_cache.extend_row(0, pending)[-1:]  # (1, V)
                for i in range(k):
                    proposals.append(logits.argmax(dim=-1, keepdim=True))  # (1, 1), stays on the device
                    if i < k - 1:
                        logits = draft_cache.decode_step(proposals[-1])
            # One target forward over `last` and the k proposals: its greedy choice after each.
            verify_ids = [last, *(torch.cat(proposals, dim=1)[0].tolist() if proposals else [])]
            choices = target_cache.extend_row(0, verify_ids).argmax(dim=-1).tolist()  # (k + 1,)
            n_accepted = 0
            while n_accepted < k and verify_ids[n_accepted + 1] == choices[n_accepted]:
                n_accepted += 1
            stats.proposed += k
            stats.accepted += n_accepted
            stats.target_forwards += 1
            # The target keeps `last` and the accepted proposals; its slots after them are dropped.
            target_cache.rewind_row(0, position + 1 + n_accepted)
            if n_accepted < k:
                # The draft has seen `last` and proposals 1..k-1: keep up to the last accepted one.
                draft_cache.rewind_row(0, position + 1 + n_accepted)
                pending = [choices[n_accepted]]
            elif k > 0:
                # All accepted: the draft never saw its own last proposal.
                pending = [verify_ids[-1], choices[k]]
            # (k == 0 only for the last token: the draft is not asked again.)
            for token in verify_ids[1 : n_accepted + 1]:
                stats.new_tokens += 1
                emitted += 1
                yield token
                if token == eos_id or emitted == max_new_tokens:
                    return
            last = choices[n_accepted]
