"""Llama's fused projections: its attention and feed-forward modules with one matmul for q, k and
v, and one for the SwiGLU gate and up projections. Same parameters, another forward, swapped in
place, in two forms:

- for training (`train.fused_projections`, lmforge.train.fused_projections): the weights are
  concatenated at each call (lmforge.ops.stacked_linear);
- for compiled decoding (lmforge.models.stacking): the weights are first made
  views of one stacked matrix, which the forward reads as it is.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lmforge.models.llama.model import Attention, FeedForward
from lmforge.models.stacking import Stacked
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


class StackedQKVAttention(Attention):
    stacked: Tensor  # (q + 2 kv, dim): wq, wk and wv are views of its rows

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = F.linear(x, self.stacked)  # (B, T, q + 2 kv)
        return qkv.split([self.wq.out_features, self.wk.out_features, self.wv.out_features], dim=-1)


class StackedGateUpFeedForward(FeedForward):
    stacked: Tensor  # (2 hidden, dim): w1 and w3 are views of its rows

    def gated(self, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.stacked).chunk(2, dim=-1)  # (B, T, hidden) x 2
        return F.silu(gate) * up


STACKED = {
    Attention: Stacked(StackedQKVAttention, ("wq", "wk", "wv")),
    FeedForward: Stacked(StackedGateUpFeedForward, ("w1", "w3")),
}
