"""Optimizers from torch.optim, with weight decay only on the matrix weights.

Norm gains, biases and embeddings are excluded from weight decay: decaying them pulls the
model towards a degenerate solution (a norm gain of 0, a token that is never seen shrinking to
nothing) without the regularising effect decay has on the matmul weights.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrix weights of linear layers (decayed) and everything else (not decayed)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # A head tied to the embedding is the embedding: on a pipeline stage that holds only the head
    # (its own copy), it must get the same treatment as the first stage's copy, or the two drift.
    for head_name, tied in (
        ("lm_head", True),
        ("output", getattr(getattr(model, "cfg", None), "tie_embeddings", False)),
    ):
        head = getattr(model, head_name, None)
        if tied and isinstance(head, nn.Linear):
            embedding_params.add(id(head.weight))
    decay, no_decay = [], []
    for param in model.parameters():  # tied weights appear once
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and id(param) not in embedding_params:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    # The fused CUDA kernels do the whole update in one launch; on CPU the foreach path is the fast one.
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    if cfg.name == "adam":
        # Adam's weight_decay is an L2 term added to the gradient.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps)
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    raise AssertionError(f"unhandled optimizer {cfg.name}")  # the config's Literal type rules this out
