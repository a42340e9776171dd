"""The fine-tuning table of docs/finetune.md, from scratch, in one command (about 15 minutes on the
project's 2-core CPU):

    python benchmarks/finetune_table.py --out runs/finetune-table [--quickstart runs/quickstart] [--seeds 3]
                                        [--mlm-steps 600] [--pooling mean|first]

The task is the built-in `stdlib-packages` (lmforge.data.builtin): which of 11 standard-library
packages a chunk of 24 source lines comes from, chunks of held-out files in the validation split.
Rows, all fine-tuned with the same budget (steps, batch, sequence length) and evaluated on the same
split:

    majority class            the most frequent training label, always
    encoder from scratch      bert `tiny` (rotary positions), random init, trained on the task
    encoder, MLM-pretrained   the same encoder first pretrained with masked LM on the stdlib corpus
    decoder + LoRA            the quickstart's llama, LoRA rank 8 on attention and MLP, a new head
    decoder, full             the quickstart's llama, every weight

The encoder rows run with --seeds seeds each (the fine-tuning seed: head init and data order);
the table gives their mean and range. Every run is a run directory under --out; the quickstart run
is trained there unless --quickstart names an existing one. The tokenizer is the quickstart's (the
encoder's corpus is the quickstart's prepared data). Both encoder rows use rotary positions
(`model.shape: {positions: rotary}`): with BERT's learned positions the masked-LM pretraining of
this budget does not get past predicting from a bag of words (docs/finetune.md). Both encoder heads
read the same pooling of the hidden states (--pooling: the mean of the tokens by default, or the
first token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from lmforge.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)
from lmforge.data.builtin import STDLIB_PACKAGES
from lmforge.data.classify import LabelledDataset, prepare_classify
from lmforge.quickstart import quickstart
from lmforge.rundir import resolve_checkpoint
from lmforge.train.pretrain import pretrain

QUIET = LoggingConfig(progress=False, tensorboard=False, plot=False, log_every=50)
SEQ = 128
STEPS = 150
BATCH = 16


def finetune_config(seed: int, init: str | None, model: ModelConfig | None, lora: int, lr: float,
                    tokenizer: str, data_dir: Path) -> RunConfig:  # fmt: skip
    return RunConfig(
        model=model or ModelConfig(),
        data=DataConfig(
            task="classify",
            source="stdlib-packages",
            seq_len=SEQ,
            val_fraction=0.2,
            tokenizer=tokenizer,
            dir=str(data_dir),
        ),  # fmt: skip
        optim=OptimConfig(name="adamw", lr=lr, weight_decay=0.01),
        schedule=ScheduleConfig(name="cosine", warmup_steps=15),
        train=TrainConfig(
            max_steps=STEPS,
            micro_batch_size=BATCH,
            seed=seed,
            eval_every=0,
            eval_batches=1000,
            compile=False,
            init=init,
        ),  # fmt: skip
        checkpoint=CheckpointConfig(every_steps=0, keep_last=1),
        logging=QUIET,
        lora=LoraConfig(rank=lora, alpha=2.0 * lora if lora else 16.0, targets=["attention", "mlp"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/finetune-table")
    parser.add_argument("--quickstart", default=None, help="an existing quickstart run (default: train one)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mlm-steps", type=int, default=600)
    parser.add_argument("--mlm-lr", type=float, default=1e-3)
    parser.add_argument(
        "--pooling", choices=["mean", "first"], default="mean", help="what the encoders' heads read"
    )
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    timings = {}

    qs = Path(args.quickstart) if args.quickstart else out / "quickstart"
    if args.quickstart is None:
        quickstart(str(qs))
    timings["quickstart"] = time.perf_counter() - started
    tokenizer = str(resolve_checkpoint(qs).resolve() / "tokenizer.json")
    corpus = str((qs / "data").resolve())

    # The encoder, pretrained with masked LM on the quickstart's corpus (same tokenizer).
    mark = time.perf_counter()
    mlm = out / "bert-mlm"
    bert = ModelConfig(family="bert", flavor="tiny", shape={"positions": "rotary"})
    mlm_cfg = RunConfig(
        model=bert,
        data=DataConfig(dir=corpus, seq_len=SEQ),
        optim=OptimConfig(name="adamw", lr=args.mlm_lr, weight_decay=0.01),
        schedule=ScheduleConfig(name="cosine", warmup_steps=30),
        train=TrainConfig(
            max_steps=args.mlm_steps, micro_batch_size=16, eval_every=0, eval_batches=20, compile=False
        ),
        checkpoint=CheckpointConfig(every_steps=0, keep_last=1),
        logging=QUIET,
    )
    mlm_result = pretrain(mlm_cfg, mlm, resume="auto")
    timings["bert masked-LM pretraining"] = time.perf_counter() - mark
    mlm_tokenizer = str(resolve_checkpoint(mlm).resolve() / "tokenizer.json")  # with the mask token

    # One split for every row (by file, seed 0), tokenized once per tokenizer: the training seed of a
    # run changes its head's init and data order, not which files it is evaluated on.
    data = {"encoder": out / "data-encoder", "decoder": out / "data-decoder"}
    for name, tok in (("encoder", mlm_tokenizer), ("decoder", tokenizer)):
        if not (data[name] / "manifest.json").is_file():
            prepare_classify(STDLIB_PACKAGES, data[name], tok, SEQ, 0.2, seed=0)
    rows: dict[str, list[dict]] = {}
    head = {"pooling": args.pooling}
    runs = {
        "encoder from scratch": lambda s: finetune_config(
            s,
            None,
            replace(bert, shape={**(bert.shape or {}), **head}),
            0,
            1e-3,
            mlm_tokenizer,
            data["encoder"],
        ),
        "encoder, MLM-pretrained": lambda s: finetune_config(  # the fine-tune sets its head's pooling
            s, str(mlm), ModelConfig(shape=head), 0, 1e-3, mlm_tokenizer, data["encoder"]
        ),
        "decoder + LoRA (rank 8)": lambda s: finetune_config(
            s, str(qs), None, 8, 2e-3, tokenizer, data["decoder"]
        ),
        "decoder, full fine-tuning": lambda s: finetune_config(
            s, str(qs), None, 0, 3e-4, tokenizer, data["decoder"]
        ),
    }
    for name, make in runs.items():
        seeds = range(args.seeds) if name.startswith("encoder") else range(1)
        for seed in seeds:
            mark = time.perf_counter()
            run_dir = out / f"{name.split()[0]}-{name.split()[-1].strip('()')}-{seed}".replace(",", "")
            result = pretrain(make(seed), run_dir, resume="auto")
            rows.setdefault(name, []).append({**result, "seconds": time.perf_counter() - mark})
            print(json.dumps({"row": name, "seed": seed, **{k: result[k] for k in ("val_accuracy", "val_macro_f1")}}),
                  flush=True)  # fmt: skip
    data_dir = data["encoder"]
    train_labels = LabelledDataset(data_dir, "train").labels
    val_labels = LabelledDataset(data_dir, "val").labels
    majority = Counter(train_labels.tolist()).most_common(1)[0][0]
    accuracy = float((val_labels == majority).mean())
    n_classes = len(set(val_labels.tolist()) | {majority})
    macro_f1 = (2 * accuracy / (1 + accuracy)) / n_classes  # only the majority class scores

    total = time.perf_counter() - started
    print(f"\n{len(train_labels)} training and {len(val_labels)} validation chunks (held-out files), 11 classes; "
          f"fine-tuning: {STEPS} steps x {BATCH} x {SEQ} tokens, AdamW, cosine; masked-LM pretraining: "
          f"{args.mlm_steps} steps x 16 x {SEQ} (val masked-LM accuracy {mlm_result['val_accuracy']:.3f}); "
          f"encoder heads read {'the mean of the tokens' if args.pooling == 'mean' else 'the first token'}; "
          f"{total / 60:.1f} minutes in all ({', '.join(f'{k} {v / 60:.1f}' for k, v in timings.items())})\n")  # fmt: skip
    print("| model | seeds | accuracy | macro-F1 | fine-tuning time |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(
        f"| majority class (always the most frequent training label) | - | {accuracy:.3f} | {macro_f1:.3f} | - |"
    )
    for name, results in rows.items():
        acc = [r["val_accuracy"] for r in results]
        f1 = [r["val_macro_f1"] for r in results]
        spread = lambda v: f" ({min(v):.3f} - {max(v):.3f})" if len(v) > 1 else ""  # noqa: E731
        print(f"| {name} | {len(results)} | {statistics.mean(acc):.3f}{spread(acc)} | "
              f"{statistics.mean(f1):.3f}{spread(f1)} | {statistics.mean(r['seconds'] for r in results):.0f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
