"""`lmforge quickstart`: the whole path on the embedded corpus in a few minutes.

Prepares the Python standard library's own source as a corpus, trains a byte-level BPE tokenizer
and a `tiny` llama model on it, evaluates, prints samples and compares the validation loss with
the corpus's unigram entropy (the loss of a model that ignores context).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)
from lmforge.evaluate.perplexity import unigram_entropy
from lmforge.infer.generate import complete
from lmforge.train.pretrain import pretrain

PROMPTS = ["def ", "import os\n", "class Parser:\n    def __init__(self"]


def quickstart_config(max_steps: int, cuda: bool) -> RunConfig:
    """The tiny llama recipe: sized so that training takes about 5 minutes on a 2-core CPU."""
    return RunConfig(
        model=ModelConfig(family="llama", flavor="tiny"),
        data=DataConfig(source="stdlib", vocab_size=8192, seq_len=256),
        optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=0.1),
        schedule=ScheduleConfig(name="cosine", warmup_steps=max_steps // 20, min_lr_ratio=0.1),
        train=TrainConfig(
            max_steps=max_steps,
            micro_batch_size=64 if cuda else 8,
            eval_every=max(1, max_steps // 4),
            eval_batches=20,
        ),
        checkpoint=CheckpointConfig(every_steps=max(1, max_steps // 4), keep_last=2),
    )


def quickstart(out: str = "runs/quickstart", max_steps: int | None = None) -> dict:
    """Train a tiny model on the standard library's source and show what it learned."""
    from lmforge.api import load

    cuda = torch.cuda.is_available()
    cfg = quickstart_config(max_steps or (2000 if cuda else 300), cuda)
    run_dir = Path(out)
    # Running it again continues (or just re-reports) the same run instead of failing.
    result = pretrain(cfg, run_dir, resume="auto")

    data_dir = run_dir / "data"
    manifest = json.loads((data_dir / "manifest.json").read_text())
    val_shards = [data_dir / s["file"] for s in manifest["shards"] if s["split"] == "val"]
    entropy = unigram_entropy(val_shards, manifest["dtype"], manifest["vocab_size"])

    model, tokenizer = load(run_dir)
    print("\nsamples (temperature 0.8, top-k 50):")
    for i, prompt in enumerate(PROMPTS):
        text = complete(model, tokenizer, prompt, 80, temperature=0.8, top_k=50, seed=i)
        print(f"--- prompt {prompt!r}\n{prompt}{text}")
    print(
        f"\nvalidation loss            {result['val_loss']:.3f} nats/token (perplexity {result['val_ppl']:.1f})\n"
        f"unigram entropy of corpus  {entropy:.3f} nats/token (the loss of a model that ignores context)\n"
        f"run directory              {run_dir}\n"
        f"loss curve                 {run_dir / 'loss.png'}\n"
        f"next: lmforge generate {run_dir} --prompt 'def main(' --max-new-tokens 100"
    )
    return {**result, "unigram_entropy": entropy}
