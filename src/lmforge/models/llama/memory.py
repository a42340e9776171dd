"""What Llama's forward (model.py) saves for backward, in bytes: the planner's activation model.

Read against model.py, per token of one block, with D = dim, F = ffn_hidden, H query heads, KV
key/value heads, hd = head_dim, c = bytes of the compute dtype, p = bytes of the parameters: fp32
(c = p = 4), bf16 parameters as FSDP2's param_dtype makes them (c = p = 2), or fp32 parameters
under bf16 autocast (c = 2, p = 4):

    RMSNorm (x2)  its input in fp32 (4D: the stream itself in fp32, an upcast copy in bf16), the
                  fp32 rsqrt (4) and the fp32 normalised input (4D); with bf16 parameters also an
                  fp32 copy of its weight (4D per block); its output is the next linears' input
                  (cD), which autocast casts once per linear (wq, wk, wv; w1, w3: 5cD), keeping
                  a bf16 copy of every weight too (2 bytes per block parameter, per block)
    attention     q, and k and v repeated to all H heads (repeat_kv copies before SDPA, unless a
                  rank holds one kv head: then the repeat is a view), after RoPE, and SDPA's
                  output: 4cD; SDPA's fp32 log-sum-exp (4H); wo's input is a
                  view of SDPA's output; RoPE keeps only its fp32 cos/sin rows (per position)
    QK-norm       an RMSNorm per head on q and k: 8 bytes per element, 4 per head (+ weight copies)
    SwiGLU MLP    w1's and w3's outputs, silu's output and the product (w2's input): 4cF
"""

from __future__ import annotations

from lmforge.models.llama.model import LlamaConfig
from lmforge.models.spec import SavedBytes


def saved_bytes(cfg: LlamaConfig, c: int, p: int, norm_stat_bytes: int, tp: int) -> SavedBytes:
    assert (
        cfg.ffn_hidden is not None and cfg.n_kv_heads is not None and cfg.head_dim is not None
    )  # __post_init__
    D, H, F = cfg.dim, cfg.n_heads, cfg.ffn_hidden
    rms = 8 * D + 4  # fp32 input, rsqrt, fp32 normalised input
    weight_copy = 4 * D if p != 4 else 0  # weight.float() of a bf16 weight
    A = H * cfg.head_dim  # the heads' width: D, unless head_dim is set apart from it (pruned heads)
    kv = cfg.n_kv_heads * cfg.head_dim if cfg.n_kv_heads == tp else A  # k, v after repeat_kv
    sharded = 2 * c * A + 2 * c * kv + 4 * H + 4 * c * F
    autocast = c != p
    block_fixed = 2 * weight_copy
    if autocast:  # a bf16 copy of each linear's weight (of the rank's shard under TP)
        q_kv = H * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
        block_fixed += c * (D * q_kv + H * cfg.head_dim * D + 3 * D * F) // tp
    if cfg.qk_norm:
        q_k = H + cfg.n_kv_heads
        sharded += 8 * q_k * cfg.head_dim + 4 * q_k
        block_fixed += 2 * 4 * cfg.head_dim if p != 4 else 0
    return SavedBytes(
        norms=2 * rms,
        inputs=(5 if autocast else 2) * c * D,
        sharded=sharded,
        block_fixed=block_fixed,
        final_norm=rms,
        final_fixed=weight_copy,
        block_positions=2 * (cfg.head_dim // 2) * 4,  # the cos and sin rows, fp32
        first_positions=0,
    )
