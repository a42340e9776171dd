"""The Python entry points: `model, tokenizer = lmforge.load(RUN_OR_CHECKPOINT)`, and
`lmforge.evaluate_text(RUN, SOURCE)`: loss, perplexity and bits per byte on any text.

Reads the run-directory format (lmforge.rundir) only: importing lmforge and loading a model
imports neither the trainer nor torch.distributed's pipelining.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmforge.adapt.lora import merge_lora
from lmforge.config import load_config
from lmforge.data.errors import DataError
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models import FamilyModel, spec_of
from lmforge.rundir import load_model_weights, meta_model, resolve_checkpoint


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[FamilyModel, Tokenizer]:
    """Model (eval mode, fp32) and tokenizer from a run directory (its newest valid checkpoint)
    or a checkpoint directory. `model(ids)` maps (batch, seq) token ids to (batch, seq, vocab) logits."""
    return load_checkpoint(resolve_checkpoint(path), device)


def load_checkpoint(ckpt_dir: Path, device: str | torch.device = "cpu") -> tuple[FamilyModel, Tokenizer]:
    """`load` of a checkpoint directory that lmforge.rundir.resolve_checkpoint already verified
    (reading every file's sha256 once is enough)."""
    model = meta_model(ckpt_dir)  # no memory spent on an init that is overwritten
    if load_config(ckpt_dir / "config.yaml").compress.quantize:  # an artifact of `lmforge compress quantize`
        from lmforge.compress.quantize import load_quantized

        return load_quantized(model, ckpt_dir, torch.device(device)).eval(), load_tokenizer(
            ckpt_dir / "tokenizer.json"
        )
    model.to_empty(device=device)
    model.init_weights()  # also fills the buffers that are not saved (e.g. RoPE tables)
    load_model_weights(model, ckpt_dir / "model")
    merge_lora(model)  # a LoRA run: the adapters folded into their layers, which then run at full speed
    return model.eval(), load_tokenizer(ckpt_dir / "tokenizer.json")


def evaluate_text(
    path: str | Path,
    source: str,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int = 50,
    device: str | torch.device = "cpu",
) -> dict:
    """Loss (nats/token), perplexity and bits per byte of a model on any text source the data
    command accepts (a file, a directory, a glob, .jsonl, .parquet, `stdlib`).

    The text is tokenized with the model's own tokenizer (documents joined as in training) and cut
    into windows of `seq_len` (default: the model's context) at stride `seq_len`, read in order: the
    first `max_batches` batches of `batch_size`. Bits per byte divide the summed loss by the bytes
    the predicted tokens stand for, so models with different tokenizers compare.
    """
    import tempfile

    import numpy as np

    from lmforge.data.loader import TokenDataset
    from lmforge.data.prepare import prepare_data
    from lmforge.evaluate.perplexity import bits_per_byte, evaluate_loss, token_byte_lengths
    from lmforge.rundir import run_precision
    from lmforge.runtime import PRECISION_NAMES, resolve_device

    if batch_size < 1 or max_batches < 1:
        raise DataError(f"batch_size and max_batches must be positive, got {batch_size} and {max_batches}")
    dev = resolve_device(str(device))
    ckpt_dir = resolve_checkpoint(path)
    model, tokenizer = load_checkpoint(ckpt_dir, device=dev)
    seq_len = seq_len or model.cfg.max_seq_len
    if not 0 < seq_len <= model.cfg.max_seq_len:
        raise DataError(
            f"seq_len must be in [1, {model.cfg.max_seq_len}] (the model's context), got {seq_len}"
        )
    with tempfile.TemporaryDirectory(prefix="lmforge-eval-") as tmp:
        prepare_data(source, tmp, val_fraction=0.0, num_workers=0, tokenizer_path=ckpt_dir / "tokenizer.json")
        text = TokenDataset(tmp, "train")  # val_fraction 0: every document is here, in order
        n_windows = min(text.n_windows(seq_len), batch_size * max_batches)
        if n_windows == 0:
            raise DataError(f"{source} has {text.n_tokens} tokens, not one window of seq_len {seq_len} + 1")
        batches = []
        for start in range(0, n_windows, batch_size):
            windows = torch.from_numpy(
                text.windows(np.arange(start, min(start + batch_size, n_windows)), seq_len)
            )
            batches.append((windows[:, :-1].contiguous(), windows[:, 1:].contiguous()))  # (B, T) each
    dtype = run_precision(ckpt_dir, dev)
    if spec_of(model).encoder:  # masked LM on the text: loss and accuracy at the masked positions
        from lmforge.data.mlm import Masker
        from lmforge.evaluate.mlm import evaluate_masked_lm

        masker = Masker(tokenizer, load_config(ckpt_dir / "config.yaml").train.seed)
        masked = evaluate_masked_lm(model, masker.batches(batches), dev, dtype)
        return {"checkpoint": str(ckpt_dir), "source": source, "loss": masked["val_loss"], "ppl": masked["val_ppl"],
                "accuracy": masked["val_accuracy"], "masked": masked["val_masked"], "windows": n_windows,
                "seq_len": seq_len, "dtype": PRECISION_NAMES[dtype]}  # fmt: skip
    result = evaluate_loss(model, batches, dev, dtype)
    loss = result["val_loss"]
    return {
        "checkpoint": str(ckpt_dir),
        "source": source,
        "loss": loss,
        "ppl": result["val_ppl"],
        "bits_per_byte": bits_per_byte(loss, (t for _, t in batches), token_byte_lengths(tokenizer)),
        "tokens": result["val_tokens"],
        "windows": n_windows,
        "seq_len": seq_len,
        "dtype": PRECISION_NAMES[dtype],
    }
