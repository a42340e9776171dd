"""BERT-style encoder: bidirectional attention with a padding mask, learned (or rotary) positions, GELU
MLP and a masked-LM head tied to the token embeddings.

Read top to bottom: config → attention → MLP → block → model (the norm is torch's nn.LayerNorm).
The shape follows BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers
for Language Understanding"): learned positions, an embedding LayerNorm, a 4x GELU MLP, a masked-LM
output matmul with the token embeddings' weight. Where it differs from the 2019 model it does as
later encoders do: the blocks are pre-norm (the LayerNorm at each sub-block's input, as GPT-2 and
most encoders since; stabler at the higher learning rates small models train with) with a final
LayerNorm that the output reads directly (no extra dense + LayerNorm transform before it, and no
output bias), and there is no next-sentence objective or segment embedding (RoBERTa, Liu et al.
2019, found it unhelpful). The masked-LM loss's gradient reaches only the head rows of the tokens in
the batch (`head_gradient: batch`; lmforge.train.mlm says why), and the classification head reads
the first token or the mean of the tokens (`pooling`).

Positions: `positions: learned` (the default) is BERT's table of learned absolute position embeddings,
added to the token embeddings. `positions: rotary` rotates each head's queries and keys instead
(RoPE, lmforge.models.rope; as ModernBERT, Warner et al. 2024) and has no position table. Measured
on the standard-library corpus (tiny flavor, 16 x 128 tokens a step, AdamW 1e-3; docs/finetune.md):
with learned positions the masked-LM accuracy is 0.14 after 300 and after 600 steps, and every
head's attention is still close to uniform (entropy 4.8 nats; ln 128 = 4.85): the model has not
learned to look at its neighbours. With rotary positions it reaches 0.34 in 300 steps.

q, k, v come from one matmul whose rows are interleaved per head, (n_heads, 3, head_dim), like
lmforge's GPT-2, so that a contiguous block of rows is a set of whole heads.

Single-device code: parallelism, compile, activation checkpointing and mixed precision are applied
from outside. An encoder does not generate: it has no KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.packing import document_positions
from lmforge.models.pooling import first_token, mean_of_tokens
from lmforge.models.rope import apply_rope, rope_tables
from lmforge.ops.cross_entropy import IGNORE_INDEX, linear_cross_entropy

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclass
class BertConfig:
    vocab_size: int
    max_seq_len: int  # the longest sequence: rows of the position table (or of the rotary tables)
    dim: int
    n_layers: int
    n_heads: int
    norm_eps: float = 1e-12  # BERT's
    dropout: float = 0.0  # embedding, attention and residual dropout (BERT used 0.1)
    n_classes: int = 0  # > 0: a classification head, read as `pooling` says (forward returns (B, n_classes))
    positions: str = "learned"  # "learned": BERT's absolute position table; "rotary": RoPE on q and k
    rope_theta: float = 10000.0  # the RoPE base, with positions="rotary"
    pooling: str = "first"  # the classification head reads: "first" token, or the "mean" of the tokens
    # Which rows of the tied head the masked-LM loss's gradient reaches in training: "batch", those of
    # the tokens in the batch (inputs and targets: tokens_in_batch, or forward's head_rows, the
    # objective's union over data-parallel ranks); "all", every row (the plain softmax).
    head_gradient: str = "batch"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"BertConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.norm_eps <= 0:
            raise ValueError(f"BertConfig.norm_eps must be positive, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BertConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"BertConfig.positions must be 'learned' or 'rotary', got {self.positions!r}")
        if self.positions == "rotary" and self.head_dim % 2 != 0:
            raise ValueError(f"BertConfig.head_dim={self.head_dim} must be even for rotary positions")
        if self.rope_theta <= 0:
            raise ValueError(f"BertConfig.rope_theta must be positive, got {self.rope_theta}")
        if self.pooling not in ("first", "mean"):
            raise ValueError(f"BertConfig.pooling must be 'first' or 'mean', got {self.pooling!r}")
        if self.head_gradient not in ("batch", "all"):
            raise ValueError(f"BertConfig.head_gradient must be 'batch' or 'all', got {self.head_gradient!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Bidirectional multi-head attention; a position attends to every position its mask allows."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)  # rows (n_heads, 3, head_dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None, rope_cos: Tensor | None, rope_sin: Tensor | None
    ) -> Tensor:
        """x: (B, T, dim); attn_mask: (B, 1, 1 or T, T) bool, True where attending is allowed, or None
        (every position sees every position); rope_cos, rope_sin: ([B,] T, head_dim // 2) each, the
        cos and sin of each position's angles with rotary positions, else None."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).unbind(3)  # 3 x (B, T, n_heads, head_dim)
        if rope_cos is not None and rope_sin is not None:
            q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_heads, T, head_dim)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, dim)
        return self.resid_dropout(self.proj(y))

    def init_weights(self, out_std: float) -> None:
        _init_linear(self.qkv, std=0.02)
        _init_linear(self.proj, std=out_std)


# ---------------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """dim -> 4*dim -> GELU (exact, as BERT) -> dim."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.proj = nn.Linear(4 * cfg.dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, dim)

    def init_weights(self, out_std: float) -> None:
        _init_linear(self.fc, std=0.02)
        _init_linear(self.proj, std=out_std)


# ---------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None, rope_cos: Tensor | None, rope_sin: Tensor | None
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, rope_cos, rope_sin)
        return x + self.mlp(self.ln_2(x))

    def init_weights(self, out_std: float) -> None:
        self.ln_1.reset_parameters()
        self.attn.init_weights(out_std)
        self.ln_2.reset_parameters()
        self.mlp.init_weights(out_std)


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def attention_mask(pad_mask: Tensor | None, doc_ids: Tensor | None) -> Tensor | None:
    """(B, 1, 1 or T, T) bool: keys that are real tokens (pad_mask (B, T), True for a token) and, for
    packed rows, in the query's own document (doc_ids (B, T)); None when everything is visible."""
    mask = None
    if doc_ids is not None:
        mask = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]  # (B, 1, T, T)
    if pad_mask is not None:
        keys = pad_mask[:, None, None, :].bool()  # (B, 1, 1, T)
        mask = keys if mask is None else mask & keys
    return mask


def tokens_in_batch(idx: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """(vocab_size,) bool: the tokens among the inputs idx (B, T) and targets (B, T; IGNORE_INDEX
    where none). No host sync."""
    rows = torch.zeros(vocab_size, dtype=torch.bool, device=idx.device)
    rows[idx] = True
    rows[torch.where(targets == IGNORE_INDEX, idx, targets)] = True  # an ignored target: its input
    return rows


class _GradientOnRows(torch.autograd.Function):
    """The identity on a (V, D) weight whose backward keeps only the gradient of the rows in `rows`
    (V,) bool: a view of the weight in forward, no copy."""

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (rows,) = ctx.saved_tensors
        return grad * rows[:, None].to(grad.dtype), None


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.positions == "learned" else None
        # Rotary positions: tables recomputed by init_weights (a meta-device build has no values).
        table_shape = (cfg.max_seq_len, cfg.head_dim // 2) if cfg.positions == "rotary" else (0,)
        self.register_buffer("rope_cos", torch.empty(table_shape, dtype=torch.float32), persistent=False)
        self.register_buffer("rope_sin", torch.empty(table_shape, dtype=torch.float32), persistent=False)
        self.rope_cos: Tensor  # (max_seq_len, head_dim // 2) fp32, or empty with learned positions
        self.rope_sin: Tensor
        self.emb_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        # Keyed "0".."n_layers-1", as the decoders: names do not depend on a pipeline's split.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # the masked-LM head, tied
        self.classifier = nn.Linear(cfg.dim, cfg.n_classes) if cfg.n_classes else None
        self.tie_weights()
        self.init_weights()

    def _blocks(self) -> list[Block]:
        return cast(list[Block], list(self.layers.values()))

    def tie_weights(self) -> None:
        """The output matmul uses tok_embeddings' weight (re-tied after a meta-device build + to_empty)."""
        if self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, 0.02) for embeddings and linear weights (BERT's), zeros for biases, LayerNorms 1
        and 0; the matrices that write into the residual stream get 0.02 / sqrt(2 * n_layers)."""
        self.tie_weights()
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=0.02)
        if self.cfg.positions == "rotary":
            self.rope_cos, self.rope_sin = rope_tables(
                self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device
            )
        elif self.pos_embeddings is not None:
            nn.init.normal_(self.pos_embeddings.weight, mean=0.0, std=0.02)
        self.emb_norm.reset_parameters()
        out_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self._blocks():
            block.init_weights(out_std)
        self.norm.reset_parameters()
        if self.classifier is not None:
            _init_linear(self.classifier, std=0.02)

    def hidden_states(
        self, idx: Tensor, pad_mask: Tensor | None = None, doc_ids: Tensor | None = None
    ) -> Tensor:
        """idx: (B, T) int64 -> the final hidden states (B, T, dim), after the last LayerNorm.

        pad_mask: (B, T), True for tokens and False for padding, which no position attends to.
        doc_ids: (B, T) for rows that pack several documents: positions restart at each, attention
        stays inside it (lmforge.models.packing).
        """
        seq_len = idx.size(1)
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds BertConfig.max_seq_len={self.cfg.max_seq_len}"
            )
        positions = (
            torch.arange(seq_len, device=idx.device) if doc_ids is None else document_positions(doc_ids)
        )
        x = self.tok_embeddings(idx)  # (B, T, dim)
        rope_cos = rope_sin = None
        if self.cfg.positions == "rotary":
            rope_cos, rope_sin = self.rope_cos[positions], self.rope_sin[positions]  # ([B,] T, head_dim // 2)
        elif self.pos_embeddings is not None:
            x = x + self.pos_embeddings(positions)
        x = self.drop(self.emb_norm(x))
        mask = attention_mask(pad_mask, doc_ids)
        for block in self._blocks():
            x = block(x, mask, rope_cos, rope_sin)
        return self.norm(x)  # (B, T, dim)

    def forward(
        self, idx: Tensor, input_pos: Tensor | None = None, targets: Tensor | None = None,
        doc_ids: Tensor | None = None, pad_mask: Tensor | None = None, head_rows: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """idx: (B, T) int64 token ids -> masked-LM logits (B, T, vocab_size) in the compute dtype.

        targets: (B, T) int64, the original token at each masked position and IGNORE_INDEX (-100)
        elsewhere: return the mean cross-entropy over the masked positions (() fp32) instead, without
        materialising the logits. With cfg.n_classes: the class logits (B, n_classes) of each row's
        first token or mean token (cfg.pooling) instead. With cfg.head_gradient "batch", the
        gradient through the masked-LM head reaches only the tied weight's rows of head_rows
        ((vocab_size,) bool), or without them of the tokens in idx and targets. input_pos is
        accepted for the decoders' signature and must be None.
        """
        if input_pos is not None:
            raise ValueError("Bert is an encoder: it has no KV cache and takes no input_pos")
        h = self.hidden_states(idx, pad_mask, doc_ids)  # (B, T, dim)
        if self.classifier is not None:  # every position, the prepended <|bos|> first, sees the whole text
            pooled = first_token(h) if self.cfg.pooling == "first" else mean_of_tokens(h, pad_mask)
            return self.classifier(pooled)  # (B, n_classes)
        weight = self.output.weight  # (vocab_size, dim)
        if self.cfg.head_gradient == "batch" and torch.is_grad_enabled():
            if head_rows is None and targets is not None:
                head_rows = tokens_in_batch(idx, targets, weight.shape[0])
            if head_rows is not None:
                weight = _GradientOnRows.apply(weight, head_rows)
        if targets is not None:  # only the chosen ~15% of positions reach the output matmul
            return linear_cross_entropy(h, weight, targets, only_counted=True)
        return self.output(h) if weight is self.output.weight else F.linear(h, weight)  # (B, T, vocab_size)

    def setup_kv_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                       device: str | torch.device | None = None) -> None:  # fmt: skip
        """An encoder does not generate text: a clear error for `lmforge generate` on it."""
        raise ValueError("a bert model is an encoder: it does not generate text (use eval or classify)")

    def clear_kv_cache(self) -> None:
        pass

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (the tied embedding/output matrix once); exclude_embeddings drops the
        position embeddings (a pure lookup; the token embeddings are also the output matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.pos_embeddings is not None:
            n -= self.pos_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, 6 N + 12 L H Q T (see the GPT-2 model file for the derivation);
        attention is bidirectional, so the 12 L H Q T term is exact here rather than an upper bound.
        N counts the tied output matmul for every position, as the decoders do: the masked-LM loss
        runs it on the chosen ~15% only, so for masked-LM training this overstates the work by about
        0.85 x 6 V D per token (a quarter of the tiny flavor's) and the MFU logged with it likewise."""
        seq_len = self.cfg.max_seq_len if seq_len is None else seq_len
        attention_flops = 12 * self.cfg.n_layers * self.cfg.n_heads * self.cfg.head_dim * seq_len
        return 6 * self.num_params(exclude_embeddings=True) + attention_flops
