"""x @ cat(w0, w1[, w2]).T as one matmul whose backward keeps the weights, not their concatenation.

The kernel of `train.fused_projections` (see lmforge.train.fused_projections for why it can pay and
what it costs); a family's fused modules (e.g. lmforge.models.llama.fused) call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
