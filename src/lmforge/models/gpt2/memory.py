"""What GPT-2's forward (model.py) saves for backward, in bytes: the planner's activation model.

Read against model.py, per token of one block, with D = dim, H heads, c = bytes of the compute
dtype, s = bytes of LayerNorm's statistics (fp32 on CUDA, the input's dtype on CPU):

    LayerNorm (x2)  its input (cD), mean and rstd (2s); its output is the next linear's input (cD)
    attention       the fused qkv output (3cD), SDPA's output (cD, c_proj's input is a view of it)
                    and its fp32 log-sum-exp (4H)
    GELU MLP        c_fc's output and GELU's output (4cD each)

Dropout is taken as 0 (pretraining): its masks are not counted. The position embedding keeps its
int64 position ids (8 bytes per position).
"""

from __future__ import annotations

from lmforge.models.gpt2.model import GPT2Config
from lmforge.models.spec import SavedBytes


def saved_bytes(cfg: GPT2Config, c: int, norm_stat_bytes: int) -> SavedBytes:
    D = cfg.dim
    ln = c * D + 2 * norm_stat_bytes
    return SavedBytes(
        norms=2 * ln,
        inputs=2 * c * D,
        sharded=4 * c * D + 4 * cfg.n_heads + 8 * c * D,
        block_fixed=0,
        final_norm=ln,
        final_fixed=0,
        block_positions=0,
        first_positions=8,
    )
