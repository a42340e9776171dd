"""What Llama's forward (model.py) saves for backward, in bytes: the planner's activation model.

Read against model.py, per token of one block, with D = dim, F = ffn_hidden, H query heads, KV
key/value heads, hd = head_dim, c = bytes of the compute dtype (4 fp32; 2 when the parameters are
bf16, as FSDP2's param_dtype makes them):

    RMSNorm (x2)  its input in fp32 (4D: the stream itself in fp32, an upcast copy in bf16), the
                  fp32 rsqrt (4) and the fp32 normalised input (4D); in bf16 also an fp32 copy of
                  its weight (4D per block); its output is the next linears' input (cD)
    attention     q, and k and v repeated to all H heads (repeat_kv copies before SDPA), after
                  RoPE, and SDPA's output: 4cD; SDPA's fp32 log-sum-exp (4H); wo's input is a
                  view of SDPA's output; RoPE keeps only its fp32 cos/sin rows (per position)
    QK-norm       an RMSNorm per head on q and k: 8 bytes per element, 4 per head (+ weight copies)
    SwiGLU MLP    w1's and w3's outputs, silu's output and the product (w2's input): 4cF
"""

from __future__ import annotations

from lmforge.models.llama.model import LlamaConfig
from lmforge.models.spec import SavedBytes


def saved_bytes(cfg: LlamaConfig, c: int, norm_stat_bytes: int) -> SavedBytes:
    assert cfg.ffn_hidden is not None and cfg.n_kv_heads is not None  # set by __post_init__
    D, H = cfg.dim, cfg.n_heads
    rms = 8 * D + 4  # fp32 input, rsqrt, fp32 normalised input
    weight_copy = 4 * D if c != 4 else 0  # weight.float() of a bf16 weight
    sharded = 4 * c * D + 4 * H + 4 * c * cfg.ffn_hidden
    block_fixed = 2 * weight_copy
    if cfg.qk_norm:
        q_k = H + cfg.n_kv_heads
        sharded += 8 * q_k * cfg.head_dim + 4 * q_k
        block_fixed += 2 * 4 * cfg.head_dim if c != 4 else 0
    return SavedBytes(
        norms=2 * rms,
        inputs=2 * c * D,
        sharded=sharded,
        block_fixed=block_fixed,
        final_norm=rms,
        final_fixed=weight_copy,
        block_positions=2 * (cfg.head_dim // 2) * 4,  # the cos and sin rows, fp32
        first_positions=0,
    )
