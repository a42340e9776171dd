"""The Python entry points: `model, tokenizer = lmforge.load(RUN_OR_CHECKPOINT)`."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.config import load_config
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models import build_model
from lmforge.train.checkpoint import load_model_weights, resolve_checkpoint
from lmforge.train.pretrain import run_model_config


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Tokenizer]:
    """Model (eval mode, fp32) and tokenizer from a run directory (its newest valid checkpoint)
    or a checkpoint directory. `model(ids)` maps (batch, seq) token ids to (batch, seq, vocab) logits."""
    ckpt_dir = resolve_checkpoint(path)
    model = meta_model(ckpt_dir)  # no memory spent on an init that is overwritten
    model.to_empty(device=device)
    model.init_weights()  # also fills the buffers that are not saved (e.g. RoPE tables)
    load_model_weights(model, ckpt_dir / "model")
    return model.eval(), load_tokenizer(ckpt_dir / "tokenizer.json")


def meta_model(ckpt_dir: Path) -> nn.Module:
    """The checkpoint's model, built from its config.yaml and tokenizer.json on the meta device."""
    cfg = load_config(ckpt_dir / "config.yaml")
    tokenizer = load_tokenizer(ckpt_dir / "tokenizer.json")
    model_cfg = run_model_config(cfg.model, cfg.data.seq_len, tokenizer.get_vocab_size())
    return build_model(model_cfg, device="meta")
