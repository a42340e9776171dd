"""Fused projections, applied from outside the model (`train.fused_projections`): one matmul for a
Llama block's q, k and v, and one for its SwiGLU gate and up projections, instead of three and two.

Why it can pay: the input is read once instead of three (two) times, and one wide GEMM keeps a GPU
busier than several narrow ones (with GQA, k and v are only n_kv_heads * head_dim wide: 512 columns
in the 1b flavor against 2048 for q). What it costs: the stacked weight is built by a `torch.cat`
in each forward (under torch.compile, fused into the cast to the compute dtype that autocast does
anyway), and its gradient is split back into views in backward.

The parameters stay the separate `wq`/`wk`/`wv` and `w1`/`w3` matrices, so checkpoints, exports,
optimizer state and FSDP sharding are unchanged by the switch. Tensor parallelism shards those
matrices by rows, where a concatenation would interleave the shards: the two do not combine.
GPT-2 blocks already hold one `c_attn` matrix for q, k and v, and their MLP has no gate: nothing to fuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.llama.model import Attention, FeedForward


class FusedQKVAttention(Attention):
    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        weight = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])  # (q + 2 kv, dim)
        qkv = F.linear(x, weight)  # (B, T, q + 2 kv)
        return qkv.split([self.wq.out_features, self.wk.out_features, self.wv.out_features], dim=-1)


class FusedGateUpFeedForward(FeedForward):
    def gated(self, x: Tensor) -> Tensor:
        gate, up = F.linear(x, torch.cat([self.w1.weight, self.w3.weight])).chunk(
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
