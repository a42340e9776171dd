"""GPT-2: a decoder-only transformer with LayerNorm, learned positions, GELU MLP and tied embeddings.

Read top to bottom: config → attention → MLP → block → model (the norm is torch's nn.LayerNorm).
Parameter names follow the GPT-2 checkpoints (`wte`, `h.{i}.attn.c_attn`, ...), but linear weights
use nn.Linear's (out_features, in_features) layout; OpenAI/Hugging Face checkpoints store them as
Conv1D (in, out), so a converter transposes c_attn, c_proj and c_fc.

c_attn's output rows are interleaved per head, (n_heads, 3, head_dim): head 0's q, k, v rows, then
head 1's, ... (not GPT-2's [q; k; v] blocks), so that a contiguous block of rows is a set of whole
heads and tensor parallelism can split c_attn by rows. A Hugging Face / OpenAI converter must
permute c_attn's rows (and bias): ours = theirs.view(3, n_heads, head_dim, dim).transpose(0, 1).

References: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2);
Brown et al. 2020, "Language Models are Few-Shot Learners" (GPT-3 sizes).

Single-device code: parallelism, compile, activation checkpointing and mixed precision are applied
from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.kv_cache import KVCache, attend_cache, local_heads
from lmforge.models.packing import document_mask, document_positions
from lmforge.models.pooling import last_token
from lmforge.ops.cross_entropy import linear_cross_entropy

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclass
class GPT2Config:
    vocab_size: int
    max_seq_len: int  # number of learned position embeddings
    dim: int
    n_layers: int
    n_heads: int
    norm_eps: float = 1e-5
    bias: bool = True  # biases in linears and LayerNorms, as GPT-2; False is a bit faster and as good
    dropout: float = 0.0  # embedding, attention and residual dropout; 0 for pretraining
    n_classes: int = 0  # > 0: a classification head on the last real token (forward returns (B, n_classes))

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"GPT2Config.dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.norm_eps <= 0:
            raise ValueError(f"GPT2Config.norm_eps must be positive, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPT2Config.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        # A property, not a stored field: it can never go stale after dataclasses.replace(dim=...),
        # and asdict() of a config round-trips through GPT2Config(**d).
        return self.dim // self.n_heads


def _init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with one fused q/k/v projection (one matmul instead of three)."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        # Rows (n_heads, 3, head_dim): per head its q, k, v rows (see the module docstring).
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kv_cache: KVCache | None = None  # set by GPT2.setup_kv_cache for generation

    def forward(self, x: Tensor, input_pos: Tensor | None, attn_mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape  # x: (B, T, dim); attn_mask: (B, 1, T, T) bool for packed documents, or None
        # -1 heads: on a tensor-parallel shard c_attn yields only this rank's (whole) heads.
        qkv = self.c_attn(x).view(B, T, -1, 3, self.head_dim)  # (B, T, n_heads, 3, head_dim)
        q, k, v = qkv.transpose(1, 2).unbind(3)  # 3 x (B, n_heads, T, head_dim)

        if self.kv_cache is None:
            # Training / full-sequence path: is_causal lets PyTorch pick flash attention on GPU.
            dropout_p = self.dropout if self.training else 0.0
            if attn_mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            else:  # packed documents: causal within each (lmforge.models.packing)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        else:
            # Generation path: the queries sit at absolute positions input_pos and attend over the
            # whole preallocated cache; the mask hides future and not-yet-written slots.
            assert input_pos is not None, "with a KV cache set up, forward needs input_pos"
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_heads, S_max, head_dim)
            y = attend_cache(q, k, v, self.kv_cache.causal_mask(input_pos))
        # y: (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_heads * head_dim)
        return self.resid_dropout(self.c_proj(y))  # (B, T, dim)

    def init_weights(self, out_std: float) -> None:
        _init_linear(self.c_attn, std=0.02)
        _init_linear(self.c_proj, std=out_std)


# ---------------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """dim -> 4*dim -> GELU -> dim. GELU with the tanh approximation, as GPT-2 was trained."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.dim, 4 * cfg.dim, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.dim, cfg.dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, T, dim) -> (B, T, 4*dim) -> (B, T, dim)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

    def init_weights(self, out_std: float) -> None:
        _init_linear(self.c_fc, std=0.02)
        _init_linear(self.c_proj, std=out_std)


# ---------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm residual block (GPT-2 moved the LayerNorm to the input of each sub-block)."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, input_pos: Tensor | None, attn_mask: Tensor | None = None) -> Tensor:
        # x: (B, T, dim) -> (B, T, dim)
        # The mask is passed only when there is one: tensor parallelism's input hook counts the inputs.
        normed = self.ln_1(x)
        x = x + (
            self.attn(normed, input_pos) if attn_mask is None else self.attn(normed, input_pos, attn_mask)
        )
        return x + self.mlp(self.ln_2(x))

    def init_weights(self, out_std: float) -> None:
        self.ln_1.reset_parameters()  # weight = 1, bias = 0; draws no random numbers
        self.attn.init_weights(out_std)
        self.ln_2.reset_parameters()
        self.mlp.init_weights(out_std)


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)  # token embeddings
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.dim)  # learned position embeddings
        self.drop = nn.Dropout(cfg.dropout)
        # A dict keyed "0".."n_layers-1", not a list: a pipeline stage deletes the blocks it does not
        # run and the rest keep their names (h.3.attn.c_attn.weight on every stage), so checkpoints
        # do not depend on the layout. Iterate with .values().
        self.h = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.classifier = nn.Linear(cfg.dim, cfg.n_classes) if cfg.n_classes else None
        self.tie_weights()
        self.init_weights()

    def _blocks(self) -> list[Block]:
        """The transformer blocks in layer order (on a pipeline stage, only the stage's own)."""
        # nn.ModuleDict types its values as nn.Module; self.h holds only Blocks.
        return cast(list[Block], list(self.h.values()))

    def tie_weights(self) -> None:
        """Make lm_head use wte's weight: tied input/output embeddings (Press & Wolf 2017), as GPT-2.

        Called by init_weights too, because Module.to_empty() from the meta device gives each module
        its own new Parameter and so silently unties them. A pipeline stage that holds only one of
        the two (lmforge.parallel.pipeline) has nothing to tie.
        """
        if self.wte is not None and self.lm_head is not None:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; deterministic given torch's RNG.

        normal(0, 0.02) for embeddings and linear weights, zeros for biases, LayerNorm weight 1 and
        bias 0; the matrices that write into the residual stream (both c_proj) get std
        0.02 / sqrt(2 * n_layers) so the stream's variance does not grow with depth (GPT-2 paper,
        Radford et al. 2019, section 2.3). lm_head shares wte's weight, so it is not drawn twice.
        """
        self.tie_weights()  # re-tie after a meta-device build + to_empty()
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=0.02)
        out_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self._blocks():
            block.init_weights(out_std)
        self.ln_f.reset_parameters()
        if self.classifier is not None:
            _init_linear(self.classifier, std=0.02)

    def forward(
        self, idx: Tensor, input_pos: Tensor | None = None, targets: Tensor | None = None,
        doc_ids: Tensor | None = None, pad_mask: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """idx: (B, T) int64 token ids -> logits (B, T, vocab_size) in the compute dtype.

        input_pos: (T,) int64 absolute positions of the tokens in idx; required once a KV cache is
        set up (prefill: arange(0, T); decode: tensor([t])). Without a cache it defaults to 0..T-1.
        With a cache it may also be (B, T), each row at its own positions (rows of different lengths
        in one cache: lmforge.models.kv_cache, lmforge.infer.generate.DecodeBatch).

        targets: (B, T) int64 next tokens: return the mean cross-entropy (() fp32) instead of the
        logits, computed chunk by chunk without materialising them (lmforge.ops.cross_entropy).

        doc_ids: (B, T) the document of each position, for rows that pack several documents: positions
        restart at each document and attention stays inside it (lmforge.models.packing). Not with a
        KV cache.

        With cfg.n_classes: the class logits (B, n_classes) of each row's last real token instead
        (pad_mask (B, T), True for tokens: rows are right-padded, so padding changes nothing before).

        A pipeline stage (lmforge.parallel.pipeline) has wte and wpe, or ln_f and lm_head, set to
        None where another stage runs them: without wte idx is the previous stage's hidden state
        (B, T, dim); without ln_f and lm_head the hidden state (B, T, dim) is returned.
        """
        seq_len = idx.size(1)  # T
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds GPT2Config.max_seq_len={self.cfg.max_seq_len}"
            )
        mask = document_mask(doc_ids) if doc_ids is not None else None  # (B, 1, T, T)
        if self.wte is not None:
            positions = torch.arange(seq_len, device=idx.device) if input_pos is None else input_pos  # (T,)
            if doc_ids is not None:
                positions = document_positions(doc_ids)  # (B, T)
            x = self.drop(self.wte(idx) + self.wpe(positions))  # (B, T, dim) + ([B,] T, dim) -> (B, T, dim)
        else:
            x = idx  # (B, T, dim)
        for block in self.h.values():
            x = block(x, input_pos) if mask is None else block(x, input_pos, mask)  # (B, T, dim)
        x = self.ln_f(x) if self.ln_f is not None else x
        if self.classifier is not None:
            return self.classifier(last_token(x, pad_mask))  # (B, n_classes)
        if targets is not None:  # (B, T) -> the mean loss, without (B, T, vocab_size) logits
            return linear_cross_entropy(x, self.lm_head.weight, targets)
        return self.lm_head(x) if self.lm_head is not None else x  # (B, T, vocab_size) or (B, T, dim)

    def setup_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        """Give every attention layer a KV cache; forward then needs input_pos.

        dtype/device default to those of the output head. Running under bf16 autocast with fp32
        weights, pass dtype=torch.bfloat16 to halve the cache's memory.
        """
        if max_seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"KV cache max_seq_len={max_seq_len} exceeds GPT2Config.max_seq_len={self.cfg.max_seq_len} "
                "(there are no position embeddings beyond it)"
            )
        dtype = self.lm_head.weight.dtype if dtype is None else dtype
        device = self.lm_head.weight.device if device is None else device
        for block in self._blocks():
            heads = local_heads(block.attn.c_attn, self.cfg.n_heads)  # all, or a TP shard's
            block.attn.kv_cache = KVCache(
                batch_size, heads, max_seq_len, self.cfg.head_dim, dtype=dtype, device=device
            )

    def clear_kv_cache(self) -> None:
        """Drop the KV caches: forward is full causal attention again (training behaviour)."""
        for block in self._blocks():
            block.attn.kv_cache = None

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters; the tied wte/lm_head matrix counts once.

        exclude_embeddings drops the position embeddings (wpe), a pure input lookup. wte stays: it
        is also the output matmul.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        if exclude_embeddings:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * N + 12 * n_layers * n_heads * head_dim * seq_len.

        6 * N: every weight matmul costs 2 FLOPs per multiply-add in the forward pass and twice that
        in the backward pass (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1).
        N = num_params(exclude_embeddings=True): all parameters except the position embeddings,
        which do no matmul; the tied wte/lm_head matrix is counted once, for the output matmul
        (biases and LayerNorm weights are left in; they are < 0.1% of N).
        12 * L * H * Q * T: the attention scores QK^T and the weighted sum AV, which have no
        parameters, counted without the causal-mask saving (Chowdhery et al. 2022, "PaLM",
        appendix B, where this exact formula appears).
        seq_len defaults to cfg.max_seq_len.
        """
        seq_len = self.cfg.max_seq_len if seq_len is None else seq_len
        attention_flops = 12 * self.cfg.n_layers * self.cfg.n_heads * self.cfg.head_dim * seq_len
        return 6 * self.num_params(exclude_embeddings=True) + attention_flops
