"""The Python entry points: `model, tokenizer = lmforge.load(RUN_OR_CHECKPOINT)`.

Reads the run-directory format (lmforge.rundir) only: importing lmforge and loading a model
imports neither the trainer nor torch.distributed's pipelining.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmforge.data.tokenizer import load_tokenizer
from lmforge.models import FamilyModel
from lmforge.rundir import load_model_weights, meta_model, resolve_checkpoint


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[FamilyModel, Tokenizer]:
    """Model (eval mode, fp32) and tokenizer from a run directory (its newest valid checkpoint)
    or a checkpoint directory. `model(ids)` maps (batch, seq) token ids to (batch, seq, vocab) logits."""
    return load_checkpoint(resolve_checkpoint(path), device)


def load_checkpoint(ckpt_dir: Path, device: str | torch.device = "cpu") -> tuple[FamilyModel, Tokenizer]:
    """`load` of a checkpoint directory that lmforge.rundir.resolve_checkpoint already verified
    (reading every file's sha256 once is enough)."""
    model = meta_model(ckpt_dir)  # no memory spent on an init that is overwritten
    model.to_empty(device=device)
    model.init_weights()  # also fills the buffers that are not saved (e.g. RoPE tables)
    load_model_weights(model, ckpt_dir / "model")
    return model.eval(), load_tokenizer(ckpt_dir / "tokenizer.json")
