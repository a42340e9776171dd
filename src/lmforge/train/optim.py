"""Optimizers from torch.optim, with weight decay only on the matrix weights.

Norm gains, biases and embeddings are excluded from weight decay: decaying them pulls the
model towards a degenerate solution (a norm gain of 0, a token that is never seen shrinking to
nothing) without the regularising effect decay has on the matmul weights.

`muon`: torch.optim's Muon (momentum, then the update orthogonalised by a Newton-Schulz
iteration; Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) for the matrices inside
the blocks, AdamW for embeddings, the output head, norms and biases, as Muon's authors prescribe.
Muon's step size is matched to AdamW's update RMS (Liu et al. 2025, "Muon is Scalable for LLM
Training"), so one `optim.lr` and one schedule serve both halves.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, muon

from lmforge.config import OptimConfig
from lmforge.models import spec_of


def _head(model: nn.Module) -> nn.Linear | None:
    """The output head of a model or pipeline stage (None on a stage without it)."""
    head = getattr(model, spec_of(model).stages.head)
    return head if isinstance(head, nn.Linear) else None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrix weights of linear layers (decayed) and everything else (not decayed)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # A head tied to the embedding is the embedding: on a pipeline stage that holds only the head
    # (its own copy), it must get the same treatment as the first stage's copy, or the two drift.
    head = _head(model)
    if head is not None and spec_of(model).stages.ties_embeddings(model.cfg):
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


class MuonAdamW(torch.optim.AdamW):
    """AdamW whose param groups marked `muon` are updated by Muon instead: one optimizer object,
    so the training loop, gradient scaling and checkpoints (torch.distributed.checkpoint's
    optimizer state dict) treat it like any other. Muon keeps a `momentum_buffer` and a `step`
    count per matrix."""

    def __init__(
        self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, momentum: float
    ):
        super().__init__(groups, lr=lr, betas=betas, eps=eps)
        for group in self.param_groups:
            group.setdefault("muon", False)
            group["momentum"] = momentum
            for param in group["params"] if group["muon"] else ():
                if param.ndim != 2 or isinstance(param, DTensor):
                    raise ValueError(
                        f"Muon needs whole 2-D matrices, got a {type(param).__name__} of {param.ndim} dims"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        every_group = self.param_groups
        try:  # AdamW's own step, over the AdamW groups only
            self.param_groups = [g for g in every_group if not g["muon"]]
            super().step()
        finally:
            self.param_groups = every_group
        for group in (g for g in every_group if g["muon"]):
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                    state["step"] = torch.zeros((), dtype=torch.float32)  # Adam's loading code wants one
                state["step"] += 1
            muon(
                params,
                [p.grad for p in params],
                [self.state[p]["momentum_buffer"] for p in params],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=True,
                ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C),
                ns_steps=DEFAULT_NS_STEPS,
                eps=EPS,
                adjust_lr_fn="match_rms_adamw",
                has_complex=False,
            )
        return loss


def muon_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The matrices inside the blocks (Muon), then the other decayed and the not decayed params (AdamW)."""
    decay, no_decay = param_groups(model, weight_decay)
    head = _head(model)
    heads = {id(head.weight)} if head is not None else set()
    hidden = [p for p in decay["params"] if p.ndim == 2 and id(p) not in heads]
    other = [p for p in decay["params"] if id(p) not in {id(h) for h in hidden}]
    return [
        {"params": hidden, "weight_decay": weight_decay, "muon": True},
        {"params": other, "weight_decay": weight_decay},
        no_decay,
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    if cfg.name == "muon":
        return MuonAdamW(muon_groups(model, cfg.weight_decay), cfg.lr, cfg.betas, cfg.eps, cfg.muon_momentum)
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
