"""Llama: a decoder-only transformer with RMSNorm, rotary position embeddings, SwiGLU and GQA.

Read top to bottom: config → RMSNorm → rotary embeddings → attention → feed-forward → block → model.
Parameter names follow Meta's reference implementation (`tok_embeddings`, `wq`, `w1`, ...), and so
does the rotary convention (rotate interleaved pairs (x[2i], x[2i+1])), so that Meta checkpoints map
onto this module name for name. (Hugging Face checkpoints permute the rows of wq/wk to use the
"rotate half" convention instead; a converter must undo that permutation.)

References: Touvron et al. 2023, "LLaMA" and "Llama 2"; Llama 3 model cards; Su et al. 2021,
"RoFormer" (RoPE); Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU); Ainslie et al. 2023,
"GQA".

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
from lmforge.models.rope import apply_rope, rope_tables
from lmforge.ops.cross_entropy import linear_cross_entropy

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    vocab_size: int
    max_seq_len: int  # longest sequence the RoPE tables (and a KV cache) cover
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None -> n_heads (plain multi-head attention)
    ffn_hidden: int | None = None  # None -> derived from dim the Llama way, see __post_init__
    multiple_of: int = 256  # ffn_hidden is rounded up to a multiple of this (matmul-friendly sizes)
    rope_theta: float = 10000.0  # RoPE base; Llama 3 uses 500000 for long context
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share tok_embeddings.weight with output.weight
    qk_norm: bool = False  # RMSNorm per head on queries and keys before RoPE (OLMo 2, Qwen3)
    n_classes: int = 0  # > 0: a classification head on the last real token (forward returns (B, n_classes))
    # None -> dim // n_heads. Set explicitly, the heads need not span dim (q, k, v are n_heads *
    # head_dim wide, wo maps that back to dim): a model whose heads were pruned keeps its head_dim.
    # Resolved like the fields above, so dataclasses.replace(cfg, dim=...) keeps it: pass
    # head_dim=None to derive it again (lmforge.models.model_config does so for dim/n_heads overrides).
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            # Llama's rule: a SwiGLU MLP has three matrices instead of two, so take 2/3 of the usual
            # 4*dim hidden size to keep the parameter count of a 4x GELU MLP, then round up.
            hidden = int(2 * (4 * self.dim) / 3)
            self.ffn_hidden = self.multiple_of * math.ceil(hidden / self.multiple_of)
        for name in ("vocab_size", "max_seq_len", "dim", "n_layers", "n_heads", "n_kv_heads",
                     "ffn_hidden", "multiple_of"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise ValueError(f"LlamaConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"LlamaConfig.head_dim must be a positive int, got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"LlamaConfig.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even: RoPE rotates pairs")
        if self.rope_theta <= 0:
            raise ValueError(f"LlamaConfig.rope_theta must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ValueError(f"LlamaConfig.norm_eps must be positive, got {self.norm_eps}")


# ---------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): LayerNorm without mean-centering or bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., dim). Statistics in fp32 because a mean of squares in bf16 loses precision;
        # the result goes back to x's dtype so the norm never silently changes the stream's dtype.
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


# ---------------------------------------------------------------------------------------------------
# Attention (its rotary positions: lmforge.models.rope)
# ---------------------------------------------------------------------------------------------------


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, n_kv_heads, S, head_dim) -> (B, n_kv_heads * n_rep, S, head_dim).

    Query head h uses key/value head h // n_rep. With n_rep == 1 this is a view (no copy).
    We expand explicitly instead of passing enable_gqa=True to scaled_dot_product_attention, which
    PyTorch documents as experimental and supported only by the flash and math kernels on CUDA; the
    explicit copy keeps every kernel (memory-efficient, cuDNN) available.
    """
    B, n_kv_heads, S, head_dim = x.shape
    return x[:, :, None].expand(B, n_kv_heads, n_rep, S, head_dim).reshape(B, n_kv_heads * n_rep, S, head_dim)


class Attention(nn.Module):
    """Causal grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        assert cfg.n_kv_heads is not None and cfg.head_dim is not None  # set by LlamaConfig.__post_init__
        # Global head counts. forward() reshapes with -1 and derives the GQA repeat factor from the
        # tensors instead, so it also runs on the local heads of a tensor-parallel shard (wq/wk/wv
        # split by output rows = by whole heads, see lmforge.parallel.tensor).
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # QK-norm bounds the attention logits whatever the weights' scale, which lets the learning
        # rate go higher (Dehghani et al. 2023, "Scaling Vision Transformers to 22B"; OLMo 2).
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.kv_cache: KVCache | None = None  # set by Llama.setup_kv_cache for generation

    def forward(
        self,
        x: Tensor,
        rope_cos: Tensor,
        rope_sin: Tensor,
        input_pos: Tensor | None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        B, T, _ = x.shape  # x: (B, T, dim); attn_mask: (B, 1, T, T) bool for packed documents, or None
        q, k, v = self.project_qkv(x)  # (B, T, n_heads * head_dim), (B, T, n_kv_heads * head_dim) x 2
        q = q.view(B, T, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = v.view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        n_rep = q.size(2) // k.size(2)  # query heads per kv head; the same on a TP shard
        q, k = self.q_norm(q), self.k_norm(k)  # over head_dim; identity without cfg.qk_norm
        q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)

        if self.kv_cache is None:
            # Training / full-sequence path: is_causal lets PyTorch pick flash attention on GPU.
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, n_heads, T, head_dim)
            if attn_mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # packed documents: causal within each (lmforge.models.packing)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            # Generation path: the queries sit at absolute positions input_pos and attend over the
            # whole preallocated cache; the mask hides future and not-yet-written slots.
            assert input_pos is not None, "with a KV cache set up, forward needs input_pos"
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv_heads, S_max, head_dim)
            # The n_rep query heads of one key/value head become n_rep * T query rows of it: the cache
            # is read as it is instead of copied n_rep times at every step (repeat_kv).
            q = q.reshape(B, k.size(1), n_rep * T, -1)  # (B, n_kv_heads, n_rep * T, head_dim)
            mask = self.kv_cache.causal_mask(input_pos, n_rep)
            y = attend_cache(q, k, v, mask).view(B, -1, T, q.size(-1))
        # y: (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, n_heads * head_dim)
        return self.wo(y)  # (B, T, dim)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Three matmuls; lmforge.train.fused_projections swaps in one over the stacked weights."""
        return self.wq(x), self.wk(x), self.wv(x)

    def init_weights(self, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std)
        for norm in (self.q_norm, self.k_norm):
            if isinstance(norm, RMSNorm):
                norm.init_weights()


# ---------------------------------------------------------------------------------------------------
# Feed-forward
# ---------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up projection, w2 the down."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, T, dim) -> (B, T, hidden) -> (B, T, dim)
        return self.w2(self.gated(x))

    def gated(self, x: Tensor) -> Tensor:
        """silu(w1 x) * w3 x, (B, T, hidden). Two matmuls; lmforge.train.fused_projections swaps in one."""
        return F.silu(self.w1(x)) * self.w3(x)

    def init_weights(self, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.w3.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.w2.weight, mean=0.0, std=out_std)


# ---------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        assert cfg.ffn_hidden is not None  # set by LlamaConfig.__post_init__
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(
        self,
        x: Tensor,
        rope_cos: Tensor,
        rope_sin: Tensor,
        input_pos: Tensor | None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        # x: (B, T, dim) -> (B, T, dim)
        normed = self.attention_norm(x)
        # The mask is passed only when there is one: tensor parallelism's input hook counts the inputs.
        if attn_mask is None:
            h = x + self.attention(normed, rope_cos, rope_sin, input_pos)
        else:
            h = x + self.attention(normed, rope_cos, rope_sin, input_pos, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.attention.init_weights(out_std)
        self.ffn_norm.init_weights()
        self.feed_forward.init_weights(out_std)


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A dict keyed "0".."n_layers-1", not a list: a pipeline stage deletes the layers it does not
        # run and the rest keep their names (layers.3.attention.wq.weight on every stage), so
        # checkpoints do not depend on the layout. Iterate with .values().
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.classifier = nn.Linear(cfg.dim, cfg.n_classes) if cfg.n_classes else None
        self.tie_weights()
        # RoPE tables are derived from the config, so they are non-persistent (not in state_dict)
        # and (re)computed by init_weights, also after a meta-device build + to_empty.
        assert cfg.head_dim is not None  # set by LlamaConfig.__post_init__
        table_shape = (cfg.max_seq_len, cfg.head_dim // 2)
        self.register_buffer("rope_cos", torch.empty(table_shape, dtype=torch.float32), persistent=False)
        self.register_buffer("rope_sin", torch.empty(table_shape, dtype=torch.float32), persistent=False)
        self.rope_cos: Tensor  # (max_seq_len, head_dim // 2), fp32
        self.rope_sin: Tensor  # (max_seq_len, head_dim // 2), fp32
        self.init_weights()

    def _blocks(self) -> list[TransformerBlock]:
        """The transformer blocks in layer order (on a pipeline stage, only the stage's own)."""
        # nn.ModuleDict types its values as nn.Module; self.layers holds only TransformerBlocks.
        return cast(list[TransformerBlock], list(self.layers.values()))

    def tie_weights(self) -> None:
        """With cfg.tie_embeddings, make the output head use tok_embeddings' weight; else a no-op.

        Called by init_weights too, because Module.to_empty() from the meta device gives each module
        its own new Parameter and so silently unties them. A pipeline stage that holds only one of
        the two (lmforge.parallel.pipeline) has nothing to tie.
        """
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables; deterministic given torch's RNG.

        normal(0, 0.02) for embeddings and linear weights, ones for norm weights; the matrices
        that write into the residual stream (wo, w2) get std 0.02 / sqrt(2 * n_layers), so the
        stream's variance does not grow with depth (GPT-2 paper, Radford et al. 2019, section 2.3).
        The RoPE tables are recomputed in fp32. (Module.to(dtype) casts buffers too: to keep fp32
        tables at long context, run in low precision with autocast rather than casting the model.)
        """
        self.tie_weights()  # re-tie after a meta-device build + to_empty()
        assert self.cfg.head_dim is not None  # set by LlamaConfig.__post_init__
        self.rope_cos, self.rope_sin = rope_tables(
            self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device
        )
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=0.02)
        out_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for layer in self._blocks():
            layer.init_weights(out_std)
        self.norm.init_weights()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=0.02)
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, mean=0.0, std=0.02)
            nn.init.zeros_(self.classifier.bias)

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

        A pipeline stage (lmforge.parallel.pipeline) has tok_embeddings, norm and output set to None
        where another stage runs them: without tok_embeddings idx is the previous stage's hidden
        state (B, T, dim); without norm and output the hidden state (B, T, dim) is returned.
        """
        seq_len = idx.size(1)  # T
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds LlamaConfig.max_seq_len={self.cfg.max_seq_len}"
            )
        positions = torch.arange(seq_len, device=idx.device) if input_pos is None else input_pos  # (T,)
        mask = None
        if doc_ids is not None:
            positions, mask = document_positions(doc_ids), document_mask(doc_ids)  # (B, T), (B, 1, T, T)
        rope_cos, rope_sin = self.rope_cos[positions], self.rope_sin[positions]  # ([B,] T, head_dim // 2)
        h = self.tok_embeddings(idx) if self.tok_embeddings is not None else idx  # (B, T, dim)
        for layer in self.layers.values():
            h = (
                layer(h, rope_cos, rope_sin, input_pos)
                if mask is None
                else layer(h, rope_cos, rope_sin, input_pos, mask)
            )
        h = self.norm(h) if self.norm is not None else h
        if self.classifier is not None:
            return self.classifier(last_token(h, pad_mask))  # (B, n_classes)
        if targets is not None:  # (B, T) -> the mean loss, without (B, T, vocab_size) logits
            return linear_cross_entropy(h, self.output.weight, targets)
        return self.output(h) if self.output is not None else h  # (B, T, vocab_size) or (B, T, dim)

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
                f"KV cache max_seq_len={max_seq_len} exceeds LlamaConfig.max_seq_len={self.cfg.max_seq_len} "
                "(the RoPE tables end there)"
            )
        assert self.cfg.n_kv_heads is not None and self.cfg.head_dim is not None
        dtype = self.output.weight.dtype if dtype is None else dtype
        device = self.output.weight.device if device is None else device
        for layer in self._blocks():
            heads = local_heads(layer.attention.wk, self.cfg.n_kv_heads)  # all, or a TP shard's
            layer.attention.kv_cache = KVCache(
                batch_size, heads, max_seq_len, self.cfg.head_dim, dtype=dtype, device=device
            )

    def clear_kv_cache(self) -> None:
        """Drop the KV caches: forward is full causal attention again (training behaviour)."""
        for layer in self._blocks():
            layer.attention.kv_cache = None

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters; a tied embedding/output matrix counts once.

        exclude_embeddings drops tok_embeddings when it is only an input lookup (untied). When tied,
        the same matrix is also the output matmul, so it stays in.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        if exclude_embeddings and not self.cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * N + 12 * n_layers * n_heads * head_dim * seq_len.

        6 * N: every weight matmul costs 2 FLOPs per multiply-add in the forward pass and twice that
        in the backward pass (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1).
        N = num_params(exclude_embeddings=True): all parameters except the untied input embedding
        lookup, which does no matmul (norm weights are left in; they are < 0.1% of N).
        12 * L * H * Q * T: the attention scores QK^T and the weighted sum AV, which have no
        parameters, counted without the causal-mask saving (Chowdhery et al. 2022, "PaLM",
        appendix B, where this exact formula appears).
        seq_len defaults to cfg.max_seq_len. With GQA the attention term still uses n_heads: every
        query head computes its own scores.
        """
        seq_len = self.cfg.max_seq_len if seq_len is None else seq_len
        assert self.cfg.head_dim is not None  # set by LlamaConfig.__post_init__
        attention_flops = 12 * self.cfg.n_layers * self.cfg.n_heads * self.cfg.head_dim * seq_len
        return 6 * self.num_params(exclude_embeddings=True) + attention_flops
