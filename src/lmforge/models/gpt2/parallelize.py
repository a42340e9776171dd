"""GPT-2's modules as the parallel code needs them: its blocks, its pipeline stage layout, its
tensor-parallel plan and the config fields that plan splits. Data only; lmforge.parallel applies it
(the kinds are explained in lmforge.models.spec, the DTensor styles in lmforge.parallel.tensor).
"""

from __future__ import annotations

from lmforge.models.spec import GatherInput, StageLayout, TensorParallelPlan

BLOCKS = "h"

STAGES = StageLayout(
    first=("wte", "wpe"),
    last=("ln_f", "lm_head"),
    embedding="wte",
    head="lm_head",
    ties_embeddings=lambda cfg: True,  # GPT-2 always ties wte and lm_head
)

TP_PLAN = TensorParallelPlan(
    # wpe(positions) is (T, dim), added to the (B, T, dim) token embeddings: a position_embedding,
    # which under sequence parallelism holds the same sequence chunk as they do.
    root={"wte": "embedding", "wpe": "position_embedding", "ln_f": "norm", "lm_head": "head"},
    block={
        "ln_1": "norm",
        # CausalSelfAttention.forward(x, input_pos): gather x only.
        "attn": GatherInput(n_other_inputs=1),
        # c_attn's rows are interleaved per head (see the GPT-2 model file), so a contiguous
        # row shard holds whole heads with their q, k and v. Its bias is sharded the same way.
        "attn.c_attn": "colwise",
        "attn.c_proj": "rowwise",  # bias replicated, added once
        "ln_2": "norm",
        "mlp": GatherInput(n_other_inputs=0),
        "mlp.c_fc": "colwise",
        "mlp.c_proj": "rowwise",
    },
)

# Heads are not split across ranks (n_heads divisible by tp); the matmul widths split evenly (dim;
# the MLP's 4 * dim follows from it). The vocabulary may split unevenly (DTensor pads the last shard).
TP_DIVISIBLE = ("n_heads", "dim")

# LoRA's target groups (lora.targets): the linear layers of attention and of the MLP.
LORA_GROUPS = {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
