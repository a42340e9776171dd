"""`lmforge quickstart`: the whole path on the embedded corpus in about three and a half minutes.

Prepares the Python standard library's own source as a corpus, trains a byte-level BPE tokenizer
and a `tiny` llama model on it, evaluates, prints samples, compares the validation loss with the
corpus's unigram entropy (the loss of a model that ignores context) and says where the time went.

The recipe takes the speedrun's measured winners down to this scale (benchmarks/RESULTS.md, "CPU:
the quickstart learns from the speedrun"): QK-norm, Muon for the block matrices, warmup-stable-decay, bf16 autocast where
the CPU computes bf16 natively (precision auto) and torch.compile, whose ~13 s of compiling a
340-step run earns back about twice (docs/speed.md).
"""

from __future__ import annotations

import time
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
from lmforge.data.loader import val_batches
from lmforge.data.prepare import load_manifest
from lmforge.evaluate.perplexity import bits_per_byte, token_byte_lengths, unigram_entropy
from lmforge.infer.generate import complete
from lmforge.rundir import decode_precision, resolve_checkpoint
from lmforge.train.pretrain import pretrain

# As many steps as fit the wall time of the quickstart before issue 12 (fp32, eager, AdamW, 300
# steps), measured side by side on the 2-core machine (benchmarks/RESULTS.md).
DEFAULT_CPU_STEPS = 340
PROMPTS = ["def ", "import os\n", "class Parser:\n    def __init__(self"]


def quickstart_config(max_steps: int, cuda: bool) -> RunConfig:
    """The quickstart recipe (recipes/tiny.yaml): the whole quickstart takes about 3.5 minutes on a
    2-core CPU with native bf16, as long as the quickstart before it (fp32, eager, AdamW)."""
    return RunConfig(
        model=ModelConfig(family="llama", flavor="tiny", qk_norm=True),
        data=DataConfig(source="stdlib", vocab_size=8192, seq_len=256),
        optim=OptimConfig(name="muon", lr=3e-3, weight_decay=0.0),
        schedule=ScheduleConfig(
            name="wsd", warmup_steps=max_steps // 30, decay_fraction=0.4, min_lr_ratio=0.0
        ),
        train=TrainConfig(
            max_steps=max_steps,
            micro_batch_size=64 if cuda else 8,
            compile=True,
            eval_every=max(1, max_steps // 2),
            eval_batches=40,  # the whole validation split of the stdlib corpus at 8 x 256
        ),
        checkpoint=CheckpointConfig(every_steps=max(1, max_steps // 2), keep_last=2),
    )


def quickstart(
    out: str = "runs/quickstart", max_steps: int | None = None, started: float | None = None
) -> dict:
    """Train a tiny model on the standard library's source and show what it learned. `started`: the
    time.perf_counter() the breakdown's total counts from (default: this call; the CLI gives the
    process's start)."""
    from lmforge.api import load_checkpoint

    started = time.perf_counter() if started is None else started
    cuda = torch.cuda.is_available()
    cfg = quickstart_config(max_steps or (2000 if cuda else DEFAULT_CPU_STEPS), cuda)
    run_dir = Path(out)
    data_dir = run_dir / "data"
    prepared_before = (data_dir / "manifest.json").is_file()
    # Running it again continues (or just re-reports) the same run instead of failing.
    result = pretrain(cfg, run_dir, resume="auto")
    if "stopped_by" in result:
        return result

    measuring = time.perf_counter()
    manifest = load_manifest(data_dir)
    val_shards = [data_dir / s["file"] for s in manifest["shards"] if s["split"] == "val"]
    entropy = unigram_entropy(val_shards, manifest["dtype"], manifest["vocab_size"])
    checkpoint = resolve_checkpoint(run_dir)
    model, tokenizer = load_checkpoint(checkpoint)
    evaluated = val_batches(data_dir, cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.eval_batches)
    bpb = bits_per_byte(result["val_loss"], (y for _, y in evaluated), token_byte_lengths(tokenizer))
    measuring_s = time.perf_counter() - measuring

    sampling = time.perf_counter()
    # As `lmforge generate` decodes one prompt, on the device the model was loaded to.
    dtype = decode_precision(checkpoint, next(model.parameters()).device)
    print("\nsamples (temperature 0.8, top-k 50):")
    for i, prompt in enumerate(PROMPTS):
        text = complete(model, tokenizer, prompt, 80, temperature=0.8, top_k=50, seed=i, dtype=dtype)
        print(f"--- prompt {prompt!r}\n{prompt}{text}")
    sampling_s = time.perf_counter() - sampling

    seconds = manifest.get("seconds", {}) if not prepared_before else {}
    phases = {
        "corpus preparation": seconds.get("tokenize", 0.0),
        "tokenizer training": seconds.get("tokenizer", 0.0),
        "training": result["train_time_s"],
        "evaluation": result["eval_time_s"] + measuring_s,
        "checkpoints": result["checkpoint_time_s"],
        "sampling": sampling_s,
    }
    total_s = time.perf_counter() - started
    phases["start-up and the rest"] = max(0.0, total_s - sum(phases.values()))
    print(
        f"\nvalidation loss            {result['val_loss']:.3f} nats/token = {bpb:.3f} bits/byte "
        f"(perplexity {result['val_ppl']:.1f}, step {result['step']})\n"
        f"unigram entropy of corpus  {entropy:.3f} nats/token (the loss of a model that ignores context)\n"
        f"run directory              {run_dir}\n"
        f"loss curve                 {run_dir / 'loss.png'}\n"
        f"next: lmforge generate {run_dir} --prompt 'def main(' --max-new-tokens 100\n"
        f"\nwhere the time went (training includes compiling, evaluation the evaluation graph's)"
    )
    for phase, phase_s in phases.items():
        print(f"  {phase:<24} {phase_s:7.1f} s")
    print(f"  {'total':<24} {total_s:7.1f} s")
    return {
        **result,
        "unigram_entropy": entropy,
        "bits_per_byte": bpb,
        "seconds": {**phases, "total": total_s},
    }
