"""What one rank holds in memory during a training step of lmforge: a model of its tensors.

Two parts, each checked exactly against the tensors of real runs (tests/plan/test_memory.py and the
gloo runs of tests/plan/test_comm.py):

`state_bytes(cfg, dims, ...)`: the parameters, gradients and optimizer states of one rank, from the
parameter shapes (a meta-device model, nothing allocated) and the way lmforge's layouts split them:
fp32 master parameters (mixed precision is autocast or FSDP's param_dtype cast), gradients of the
same shape (FSDP2 and TP: the local shard; DDP: the whole model), AdamW's two moments of the same
shape plus one fp32 step counter per parameter tensor.

`activation_bytes(cfg, rows, seq_len, ...)`: the bytes autograd saves for backward in one
micro-batch's forward, as `torch.autograd.graph.saved_tensors_hooks` sees them (storages counted
once, parameters and buffers left out), derived from what each op of lmforge's model files saves.
Per token and per block, with D = dim, F = ffn_hidden, H = query heads, c = bytes of the compute
dtype (4 fp32; 2 when the parameters themselves are bf16, as FSDP2's param_dtype makes them):

    llama  RMSNorm (twice):  the input in fp32 (4D: the stream itself in fp32, an upcast copy in
                             bf16), the fp32 rsqrt (4) and the fp32 normalised input (4D), then its
                             output as the next linear's input (cD)
           attention:        q, k and v after RoPE, k and v repeated to all H heads (lmforge's GQA
                             expands before SDPA), and SDPA's output: 4cD; SDPA's fp32 log-sum-exp
                             per head (4H); wo's input is a view of SDPA's output
           SwiGLU MLP:       w1's and w3's outputs, silu's output, their product (w2's input): 4cF
           QK-norm adds an RMSNorm over q (H heads) and k (KV heads) per head: 8 bytes per element
           and 4 per head; in bf16, each RMSNorm also keeps an fp32 copy of its weight (4D, per
           block, not per token) and RoPE its fp32 cos/sin tables (per forward)
    gpt2   LayerNorm (twice): input, output (cD each), mean and rstd (s each, s = c on CPU, 4 on CUDA)
           attention:        the fused qkv output (3cD), SDPA's output (cD) and log-sum-exp (4H)
           GELU MLP:         c_fc's output and GELU's output (4cD each)

and once per micro-batch: the token ids (int64), the final norm, and the loss: the fused loss
(lmforge.ops.cross_entropy.linear_cross_entropy) keeps the gradients it computes in forward, of
the last hidden state (cD per token) and of the head (4 V D); the plain loss (tp or pp > 1) keeps
the head's input (cD) and the fp32 log-softmax (4V per token).

Activation checkpointing replaces a checkpointed block's saved tensors by its input (the stream:
c bytes per element); backward then holds one block's tensors again while it recomputes it, which
`peak_transient_bytes` adds. Dropout is taken as 0 (pretraining): a dropout mask is not counted.

Tensor parallelism divides what lives on heads and MLP channels by tp and, with sequence
parallelism, the norms by tp too; the linears keep their gathered full-sequence input (DTensor
saves it). That part is modelled from what DTensor saves, not measured by the hook count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.models import FamilyConfig, GPT2Config, LlamaConfig
from lmforge.parallel.mesh import ParallelDims
from lmforge.plan.comm import MASTER_BYTES, _Inventory, checkpointed_blocks

# Optimizer state per parameter element and per parameter tensor, in fp32: AdamW keeps two moments
# (exp_avg, exp_avg_sq) and a step counter tensor; SGD with momentum one buffer; AdaGrad one sum
# and a step.
OPTIMIZER_STATE = {"adamw": (2, 1), "adam": (2, 1), "sgd": (1, 0), "adagrad": (1, 1)}

# The rows linear_cross_entropy computes at once (its chunk_size default): one (chunk, V) fp32 block
# of logits and its compute-dtype copy are alive during the loss's forward.
LOSS_CHUNK = 4096


@dataclass(frozen=True)
class StateBytes:
    """Bytes of one rank's parameters, gradients and optimizer states (the largest rank's shard)."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def rank_stages(dims: ParallelDims, pp_rank: int, pp_schedule: str) -> tuple[list[int], int]:
    """(the pipeline stages rank pp_rank holds, the number of stages): lmforge's loop-style placement,
    rank r holds stages r, r + pp, ... (two per rank for interleaved_1f1b)."""
    per_rank = 2 if dims.pp > 1 and pp_schedule == "interleaved_1f1b" else 1
    n_stages = dims.pp * per_rank
    return list(range(pp_rank, n_stages, dims.pp)), n_stages


def state_bytes(
    cfg: FamilyConfig,
    dims: ParallelDims,
    pp_rank: int = 0,
    pp_schedule: str = "1f1b",
    optimizer: str = "adamw",
) -> StateBytes:
    """Parameters, gradients and optimizer states of pipeline rank `pp_rank`, on its TP and FSDP
    rank 0 (torch.chunk gives the first ranks the larger chunks: rank 0 holds the most)."""
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(
            f"no state model for optimizer {optimizer!r}; choose one of {sorted(OPTIMIZER_STATE)}"
        )
    inventory = _Inventory.of(cfg)
    stages, n_stages = rank_stages(dims, pp_rank, pp_schedule)
    numel = grad_numel = n_tensors = 0
    # Under TP without FSDP, the gradient of a rowwise (vocab- or position-sharded) embedding comes
    # back Replicate: every rank holds it whole until the optimizer step (FSDP reduce-scatters it;
    # a token embedding tied to the colwise head gets the head's sharded gradient).
    plan = inventory.plan
    embeddings = {plan.position_embedding} | (set() if plan.tied else {plan.embedding})
    if dims.tp == 1 or dims.dp_shard > 1:
        embeddings = set()
    embeddings.discard(None)  # a family without position embeddings
    for stage in stages:
        for p in inventory.stage_params(stage, n_stages):
            # FSDP2 pads dim 0 to a multiple of dp_shard; each rank then holds 1/dp_shard of it.
            local = inventory.tp_local_numel(p, dims.tp, dims.dp_shard) // dims.dp_shard
            numel += local
            grad_numel += math.prod(p.shape) if p.root_module in embeddings else local
            n_tensors += 1
    per_element, per_tensor = OPTIMIZER_STATE[optimizer]
    return StateBytes(
        numel * MASTER_BYTES,
        grad_numel * MASTER_BYTES,
        (per_element * numel + per_tensor * n_tensors) * MASTER_BYTES,
    )


@dataclass(frozen=True)
class ActivationBytes:
    """What one micro-batch's forward leaves for backward on one rank, by where it comes from."""

    blocks: int  # the rank's blocks (checkpointed ones: their input only)
    per_block: int  # one block not checkpointed (what recomputing a checkpointed one holds again)
    other: int  # embeddings, final norm, loss, RoPE tables, norm-weight copies

    @property
    def total(self) -> int:
        return self.blocks + self.other


def activation_bytes(
    cfg: FamilyConfig,
    rows: int,
    seq_len: int,
    compute_bytes: int = 2,
    activation_checkpointing: str = "none",
    blocks: range | list[int] | None = None,
    first: bool = True,
    last: bool = True,
    tp: int = 1,
    sequence_parallel: bool = True,
    fused_loss: bool | None = None,
    norm_stat_bytes: int = 4,
) -> ActivationBytes:
    """Bytes saved for backward by one micro-batch of `rows` sequences of `seq_len` tokens.

    compute_bytes: the dtype the parameters compute in (2: bf16 under FSDP2's param_dtype; 4: fp32).
    blocks: the global indices of the blocks this rank runs (default: all); first, last: whether it
    runs the embeddings, and the final norm and loss. fused_loss: default as pretrain resolves it
    (on unless tp or pp > 1). norm_stat_bytes: GPT-2's LayerNorm mean and rstd (fp32 on CUDA, the
    input's dtype on CPU).
    """
    blocks = range(cfg.n_layers) if blocks is None else blocks
    if fused_loss is None:
        fused_loss = tp == 1 and first and last
    tokens = rows * seq_len
    c, D, H, V = compute_bytes, cfg.dim, cfg.n_heads, cfg.vocab_size
    sp = tp if sequence_parallel else 1  # the norms see 1/sp of the sequence
    if isinstance(cfg, LlamaConfig):
        assert cfg.ffn_hidden is not None and cfg.n_kv_heads is not None
        rms = 8 * D + 4  # per token: fp32 input, rsqrt, fp32 normalised input
        sharded = 4 * c * D + 4 * H + 4 * c * cfg.ffn_hidden  # attention and MLP, split by tp
        weight_copies = 2 * 4 * D if c != 4 else 0  # RMSNorm's weight.float() of a bf16 weight
        if cfg.qk_norm:
            q_k = H + cfg.n_kv_heads
            sharded += 8 * q_k * cfg.head_dim + 4 * q_k
            weight_copies += 2 * 4 * cfg.head_dim if c != 4 else 0
        per_block = tokens * (2 * rms) // sp + tokens * 2 * c * D + tokens * sharded // tp + weight_copies
        final_norm = tokens * rms // sp + (4 * D if c != 4 else 0)
        rope = 2 * seq_len * (cfg.head_dim // 2) * 4  # the cos and sin rows of this sequence, fp32
        other = rope if blocks else 0
    elif isinstance(cfg, GPT2Config):
        ln = c * D + 2 * norm_stat_bytes  # per token: input, mean and rstd
        sharded = 4 * c * D + 4 * H + 8 * c * D
        per_block = tokens * 2 * ln // sp + tokens * 2 * c * D + tokens * sharded // tp
        final_norm = tokens * ln // sp
        other = 8 * seq_len if first else 0  # the position ids (int64) the position embedding keeps
    else:  # pragma: no cover - FamilyConfig is the union of the two
        raise TypeError(f"no activation model for {type(cfg).__name__}")
    stream = c * D  # a checkpointed block keeps its input only
    n_checkpointed = checkpointed_blocks(blocks, activation_checkpointing)
    n_kept = len(blocks) - n_checkpointed
    saved_blocks = n_kept * per_block + n_checkpointed * tokens * stream
    if first:
        other += 8 * tokens  # the token ids, kept by the embedding
    if last:
        other += final_norm
        if fused_loss:
            other += tokens * c * D + 4 * V * D  # the gradients of the hidden state and the head
        else:
            other += tokens * (c * D + 4 * math.ceil(V / tp) * tp)  # head input, fp32 log-softmax
    return ActivationBytes(saved_blocks, per_block, other)


def loss_transient_bytes(
    cfg: FamilyConfig, rows: int, seq_len: int, compute_bytes: int, fused_loss: bool
) -> int:
    """Bytes alive only while the loss's forward runs: the fused loss's (chunk, V) fp32 logits and
    their compute-dtype softmax; the plain loss's logits and their fp32 upcast for the whole batch."""
    n = min(LOSS_CHUNK, rows * seq_len) if fused_loss else rows * seq_len
    return n * cfg.vocab_size * (4 + compute_bytes)
