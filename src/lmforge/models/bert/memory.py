"""What the BERT-style encoder's forward (model.py) saves for backward, in bytes: the planner's
activation model, checked against autograd by tests/plan/test_memory.py.

Per token of one block it is GPT-2's (see models/gpt2/memory.py: the same pre-norm block, with
exact GELU, whose backward keeps the same tensors, and non-causal attention, which keeps the same
SDPA output and log-sum-exp). Outside the blocks: the embedding LayerNorm (its input, the sum of
token and position embeddings in the parameters' dtype, and its statistics), the position ids
(int64, per position), the final LayerNorm, which the masked-LM output reads directly, and the
masked-LM loss's bool mask of the positions that have a target (it gathers those rows first), and
once per forward, with `head_gradient: batch`, the bool mask of the head rows the gradient reaches.

With rotary positions (no position table) attention also keeps q and k after RoPE (2cD; v stays a
view of the qkv output, which stays saved whole) and, once per forward (every block shares them),
the fp32 cos and sin rows RoPE multiplies by; no position ids are kept (the tables are buffers:
indexing them needs no backward).

The fused masked-LM loss keeps the hidden state's gradient for the counted rows only (about 15%);
the prediction counts every row (as when every position has a target), so for masked-LM training
it is an upper bound by about 0.85 x tokens x p x D.
"""

from __future__ import annotations

from lmforge.models.bert.model import BertConfig
from lmforge.models.spec import SavedBytes


def saved_bytes(cfg: BertConfig, c: int, p: int, norm_stat_bytes: int, tp: int) -> SavedBytes:
    D = cfg.dim
    stats = 2 * (norm_stat_bytes if p != 4 else 4)
    ln = p * D + stats
    autocast = c != p
    rotary = cfg.positions == "rotary"
    return SavedBytes(
        norms=2 * ln,
        inputs=2 * c * D,
        sharded=4 * c * D + 4 * cfg.n_heads + 8 * c * D + (2 * c * D if rotary else 0),
        block_fixed=c * 12 * D * D // tp if autocast else 0,
        final_norm=ln,
        final_fixed=cfg.vocab_size if cfg.head_gradient == "batch" else 0,  # the head rows' bool mask
        block_positions=2 * (cfg.head_dim // 2) * 4 if rotary else 0,
        first_positions=0 if rotary else 8,  # the learned positions' ids
        first_norm=ln,
        fused_loss=1,  # the bool mask of the positions that have a target
    )
