"""The softmax step of the fused linear cross-entropy (lmforge.ops.cross_entropy) on one chunk of
fp32 logits, two ways: logsumexp, then sub_ and exp_ (before 2026-12-07), against the in-place
max / exp / sum / divide the loss now uses. Same results; prints ms per chunk, 3 alternated rounds.

    python benchmarks/ce_softmax.py [--rows 1024] [--vocab 50304]
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.ops.cross_entropy import exp_in_place


def with_logsumexp(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    return loss, logits.sub_(lse[:, None]).exp_()


def in_place(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    lse, exps, row_sum = exp_in_place(logits)  # what the loss runs
    return (lse - target_logit).sum(), exps.div_(row_sum[:, None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304)
    args = parser.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.vocab) * 3
    targets = torch.randint(0, args.vocab, (args.rows,))
    want_loss, want_grad = with_logsumexp(logits.clone(), targets)
    got_loss, got_grad = in_place(logits.clone(), targets)
    torch.testing.assert_close(got_loss, want_loss)
    torch.testing.assert_close(got_grad, want_grad)
    ms: dict[str, list[float]] = {}
    for _ in range(3):
        for fn in (with_logsumexp, in_place):
            copies = [logits.clone() for _ in range(5)]
            start = time.perf_counter()
            for copy in copies:
                fn(copy, targets)
            ms.setdefault(fn.__name__, []).append((time.perf_counter() - start) / len(copies) * 1e3)
    for name, values in ms.items():
        print(f"{name}: {[round(v, 1) for v in values]} ms per {args.rows} x {args.vocab} chunk")


if __name__ == "__main__":
    main()
