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

The kernel is lmforge.ops.stacked_linear; the fused modules are the family's
(lmforge.models.llama.fused), listed in its FamilySpec.fused_modules.
"""

from __future__ import annotations

from torch import nn

from lmforge.models import spec_of


def apply_fused_projections(model: nn.Module) -> int:
    """Swap every module of `model` (a whole model or a pipeline stage) that its family has a fused
    version of (FamilySpec.fused_modules: Llama's attention and feed-forward) for it, in place;
    returns how many were swapped (0 for GPT-2)."""
    fused_modules = spec_of(model).fused_modules
    count = 0
    for module in model.modules():
        fused = fused_modules.get(type(module))
        if fused is not None:
            module.__class__ = fused  # same attributes and parameters, another forward
            count += 1
    return count
