"""Llama's fused projections: its attention and feed-forward modules with one matmul for q, k and
v, and one for the SwiGLU gate and up projections (lmforge.ops.stacked_linear). Same parameters,
another forward: `train.fused_projections` swaps the classes in place (lmforge.train.fused_projections).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lmforge.models.llama.model import Attention, FeedForward
from lmforge.ops.stacked_linear import StackedLinear


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


FUSED = {Attention: FusedQKVAttention, FeedForward: FusedGateUpFeedForward}
