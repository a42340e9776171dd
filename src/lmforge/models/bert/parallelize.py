"""The BERT-style encoder's modules as the parallel code needs them: its blocks, its stage layout,
a tensor-parallel plan and the config fields that plan splits. Data only; lmforge.parallel applies it.

Data parallelism (DDP, FSDP2) applies to it as to the decoders. Tensor and pipeline parallelism are
not offered for it yet (FamilySpec.encoder: lmforge.train.pretrain refuses them; its objectives have no pipeline loss):
an encoder of this size trains data-parallel.
"""

from __future__ import annotations

from lmforge.models.spec import GatherInput, StageLayout, TensorParallelPlan

BLOCKS = "layers"

STAGES = StageLayout(
    first=("tok_embeddings", "pos_embeddings", "emb_norm"),
    last=("norm", "output"),
    embedding="tok_embeddings",
    head="output",
    ties_embeddings=lambda cfg: True,  # the masked-LM output uses the token embeddings' weight
)

TP_PLAN = TensorParallelPlan(
    root={
        "tok_embeddings": "embedding",
        "pos_embeddings": "position_embedding",
        "emb_norm": "norm",
        "norm": "norm",
        "output": "head",
    },  # fmt: skip
    block={
        "ln_1": "norm",
        "attn": GatherInput(n_other_inputs=3),  # the mask, the rotary cos and sin
        "attn.qkv": "colwise",
        "attn.proj": "rowwise",
        "ln_2": "norm",
        "mlp": GatherInput(n_other_inputs=0),
        "mlp.fc": "colwise",
        "mlp.proj": "rowwise",
    },
)

TP_DIVISIBLE = ("n_heads", "dim")

# LoRA's target groups (lora.targets): the linear layers of attention and of the MLP.
LORA_GROUPS = {"attention": ("attn.qkv", "attn.proj"), "mlp": ("mlp.fc", "mlp.proj")}
