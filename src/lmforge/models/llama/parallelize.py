"""Llama's modules as the parallel code needs them: its blocks, its pipeline stage layout, its
tensor-parallel plan and the config fields that plan splits. Data only; lmforge.parallel applies it
(the kinds are explained in lmforge.models.spec, the DTensor styles in lmforge.parallel.tensor).
"""

from __future__ import annotations

from lmforge.models.spec import GatherInput, StageLayout, TensorParallelPlan

BLOCKS = "layers"

STAGES = StageLayout(
    first=("tok_embeddings",),
    last=("norm", "output"),
    embedding="tok_embeddings",
    head="output",
    ties_embeddings=lambda cfg: cfg.tie_embeddings,
)

# Megatron-LM: q, k, v and the gate/up projections split by output rows, i.e. by whole heads and
# by hidden units (Attention reshapes with -1 heads, so it runs on a rank's local heads); wo and
# the down projection w2 split by input columns, their partial outputs summed into the stream.
TP_PLAN = TensorParallelPlan(
    root={"tok_embeddings": "embedding", "norm": "norm", "output": "head"},
    block={
        "attention_norm": "norm",
        # Attention.forward(x, rope_cos, rope_sin, input_pos): gather x only.
        "attention": GatherInput(n_other_inputs=3),
        "attention.wq": "colwise",
        "attention.wk": "colwise",
        "attention.wv": "colwise",
        "attention.wo": "rowwise",
        "ffn_norm": "norm",
        "feed_forward": GatherInput(n_other_inputs=0),
        "feed_forward.w1": "colwise",
        "feed_forward.w3": "colwise",
        "feed_forward.w2": "rowwise",
    },
)

# Heads are not split across ranks (n_heads and n_kv_heads divisible by tp); the matmul widths
# (dim, ffn_hidden) split evenly. The vocabulary may split unevenly (DTensor pads the last shard).
TP_DIVISIBLE = ("n_heads", "n_kv_heads", "dim", "ffn_hidden")

# LoRA's target groups (lora.targets): the linear layers of attention and of the MLP.
LORA_GROUPS = {
    "attention": ("attention.wq", "attention.wk", "attention.wv", "attention.wo"),
    "mlp": ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
}
