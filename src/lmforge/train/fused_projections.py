"""Fused projections, applied from outside the model (`train.fused_projections`): one matmul for a
Llama block's q, k and v, and one for its SwiGLU gate and up projections, instead of three and two.

Why it can pay: the input is read once instead of three (two) times, and one wide GEMM keeps a GPU
busier than several narrow ones (with GQA, k and v are only n_kv_heads * head_dim wide: 512 columns
in the 1b flavor against 2048 for q). What it costs: the stacked weight is concatenated in forward
and again in backward (under torch.compile, fused into the cast to the compute dtype).

The parameters stay the separate `wq`/`wk`/`wv` and `w1`/`w3` matrices, so checkpoints, exports,
optimizer state and FSDP sharding are unchanged by the switch. Backward keeps those parameters, not
their concatenation: under FSDP they are the gathered weights that FSDP frees after forward and
gathers again for backward, and a concatenation kept alive would hold them whole on every rank.
Tensor parallelism shards the matrices by rows, where a concatenation would interleave the shards:
the two do not combine. GPT-2 blocks already hold one `c_attn` matrix for q, k and v, and their
MLP has no gate: nothing to fuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.llama.model import Attention, FeedForward


class StackedLinear(torch.autograd.Function):
    """x @ cat(w0, w1[, w2]).T as one matmul, in the autocast dtype when autocast is on (as nn.Linear).

    Saves x (cast) and the weights themselves; backward concatenates the weights again. Written
    here because autograd would otherwise keep the concatenated copy from forward to backward.
    The weights are named arguments, not *weights: Dynamo in torch 2.11 fails to trace a variadic
    forward under no_grad (evaluation) once it has traced it with grad (tests/train/test_speed_switches).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w0: Tensor, w1: Tensor, w2: Tensor | None = None) -> Tensor:
        weights = (w0, w1) if w2 is None else (w0, w1, w2)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x_cast = x.to(dtype)
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(x_cast, *weights)
        with torch.autocast(device, enabled=False):
            return F.linear(x_cast, torch.cat(weights).to(dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x_cast, *weights = ctx.saved_tensors
        grad_out = grad_out.to(x_cast.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ torch.cat(weights).to(x_cast.dtype)).to(ctx.x_dtype)  # (..., in)
        grad_weight = grad_out.flatten(0, -2).mT @ x_cast.flatten(0, -2)  # (sum of outs, in)
        grad_weights = [
            g.to(w.dtype)
            for g, w in zip(grad_weight.split([w.size(0) for w in weights]), weights, strict=True)
        ]
        return grad_x, *grad_weights, *([None] if len(weights) == 2 else [])


class FusedQKVAttention(Attention):
    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = StackedLinear.apply(x, self.wq.weight, self.wk.weight, self.wv.weight)  # (B, T, q + 2 kv)
        return qkv.split([self.wq.out_features, self.wk.out_features, self.wv.out_features], dim=-1)


class FusedGateUpFeedForward(FeedForward):
    def gated(self, x: Tensor) -> Tensor:
        gate, up = StackedLinear.apply(x, self.w1.weight, self.w3.weight).chunk(
            2, dim=-1
        )  # (B, T, hidden) x 2
        return F.silu(gate) * up


_FUSED = {Attention: FusedQKVAttention, FeedForward: FusedGateUpFeedForward}


def apply_fused_projections(model: nn.Module) -> int:
    """Swap every Llama attention and feed-forward module of `model` (a whole model or a pipeline
    stage) for its fused version, in place; returns how many were swapped (0 for GPT-2)."""
    count = 0
    for module in model.modules():
        fused = _FUSED.get(type(module))
        if fused is not None:
            module.__class__ = fused  # same attributes and parameters, another forward
            count += 1
    return count
