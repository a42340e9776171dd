"""The masked-LM training step with and without gathering the positions that have a target before
the tied output matmul (lmforge.ops.cross_entropy.linear_cross_entropy's only_counted).

    python benchmarks/mlm_step.py [--rounds 3] [--steps 15] [--positions rotary]

bert `tiny`, 16 x 128 tokens (15% masked as lmforge.data.mlm masks them), bf16 autocast on CPU,
AdamW; each round times --steps steps of each variant after 3 warm-up steps, the two alternated.
Prints tokens/s per round and the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.data.mlm import mask_tokens
from lmforge.models import build_model, model_config
from lmforge.ops.cross_entropy import linear_cross_entropy

BATCH, SEQ, VOCAB, SPECIAL = 16, 128, 8192, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--positions", default="rotary", choices=["learned", "rotary"])
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = model_config("bert", "tiny", vocab_size=VOCAB + 64, max_seq_len=SEQ, positions=args.positions)
    model = build_model(cfg, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(SPECIAL, VOCAB, (BATCH, SEQ))
    inputs, targets = mask_tokens(tokens, list(range(BATCH)), 0, VOCAB, list(range(SPECIAL)), VOCAB)

    def step(gathered: bool) -> None:
        with torch.autocast("cpu", torch.bfloat16):
            if gathered:  # the model's own loss
                loss = model(inputs, targets=targets)
            else:
                loss = linear_cross_entropy(model.hidden_states(inputs), model.output.weight, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tokens_per_s: dict[bool, list[float]] = {True: [], False: []}
    for gathered in (True, False):
        for _ in range(3):
            step(gathered)
    for _ in range(args.rounds):
        for gathered in (True, False):
            start = time.perf_counter()
            for _ in range(args.steps):
                step(gathered)
            tokens_per_s[gathered].append(BATCH * SEQ * args.steps / (time.perf_counter() - start))
    for gathered, values in tokens_per_s.items():
        name = "gathered" if gathered else "every row"
        print(f"{name}: {[round(v) for v in values]} tokens/s, median {statistics.median(values):.0f}")
    print(
        "per-round ratio:",
        [round(a / b, 3) for a, b in zip(tokens_per_s[True], tokens_per_s[False], strict=True)],
    )


if __name__ == "__main__":
    main()
