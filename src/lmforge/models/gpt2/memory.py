"""What GPT-2's forward (model.py) saves for backward, in bytes: the planner's activation model.

Read against model.py, per token of one block, with D = dim, H heads, c = bytes of the compute
dtype, p = bytes of the parameters (c = p = 4 fp32, c = p = 2 bf16 parameters, c = 2 and p = 4
under bf16 autocast), s = bytes of LayerNorm's statistics (fp32 on CUDA and under autocast, the
input's dtype on CPU):

    LayerNorm (x2)  its input (pD: the stream), mean and rstd (2s); its output is the next linear's
                    input (cD: under autocast, the linear's bf16 copy of it; autocast also keeps a
                    bf16 copy of every weight, 2 bytes per block weight element)
    attention       the fused qkv output (3cD), SDPA's output (cD, c_proj's input is a view of it)
                    and its fp32 log-sum-exp (4H)
    GELU MLP        c_fc's output and GELU's output (4cD each)

Dropout is taken as 0 (pretraining): its masks are not counted. The position embedding keeps its
int64 position ids (8 bytes per position).
"""

from __future__ import annotations

from lmforge.models.gpt2.model import GPT2Config
from lmforge.models.spec import SavedBytes


def saved_bytes(cfg: GPT2Config, c: int, p: int, norm_stat_bytes: int, tp: int) -> SavedBytes:
    D = cfg.dim
    ln = p * D + 2 * (norm_stat_bytes if p != 4 else 4)
    autocast = c != p
    return SavedBytes(
        norms=2 * ln,
        inputs=2 * c * D,
        sharded=4 * c * D + 4 * cfg.n_heads + 8 * c * D,
        block_fixed=c * 12 * D * D // tp if autocast else 0,  # c_attn 3D^2, c_proj D^2, MLP 8D^2
        final_norm=ln,
        final_fixed=0,
        block_positions=0,
        first_positions=8,
    )
