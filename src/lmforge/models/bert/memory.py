"""What the BERT-style encoder's forward (model.py) saves for backward, in bytes: the planner's
activation model, checked against autograd by tests/plan/test_memory.py.

Per token of one block it is GPT-2's (see models/gpt2/memory.py: the same pre-norm block, with
exact GELU, whose backward keeps the same tensors, and non-causal attention, which keeps the same
SDPA output and log-sum-exp). Outside the blocks: the embedding LayerNorm (its input, the sum of
token and position embeddings in the parameters' dtype, and its statistics), the position ids
(int64, per position) and the final LayerNorm, which the masked-LM output reads directly.
"""

from __future__ import annotations

from lmforge.models.bert.model import BertConfig
from lmforge.models.spec import SavedBytes


def saved_bytes(cfg: BertConfig, c: int, p: int, norm_stat_bytes: int, tp: int) -> SavedBytes:
    D = cfg.dim
    stats = 2 * (norm_stat_bytes if p != 4 else 4)
    ln = p * D + stats
    autocast = c != p
    return SavedBytes(
        norms=2 * ln,
        inputs=2 * c * D,
        sharded=4 * c * D + 4 * cfg.n_heads + 8 * c * D,
        block_fixed=c * 12 * D * D // tp if autocast else 0,
        final_norm=ln,
        final_fixed=0,
        block_positions=0,
        first_positions=8,
        first_norm=ln,
    )
