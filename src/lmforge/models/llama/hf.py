"""Llama <-> Hugging Face transformers' LlamaForCausalLM: config.json keys and weight names.

Names: tok_embeddings -> model.embed_tokens, layers.N.attention.{wq,wk,wv,wo} ->
model.layers.N.self_attn.{q,k,v,o}_proj, feed_forward.{w1,w3,w2} -> mlp.{gate,up,down}_proj,
attention_norm / ffn_norm -> input_layernorm / post_attention_layernorm, norm -> model.norm,
output -> lm_head (left out when tied: transformers ties it to the embedding itself).

RoPE: this model rotates interleaved pairs (x[2i], x[2i+1]) of each head (Meta's convention);
transformers rotates halves (x[i], x[i + head_dim/2]). The attention scores are the same if the
rows of wq and wk are permuted within each head so that our row 2i + j becomes row j * head_dim/2 + i
(what transformers' convert_llama_weights_to_hf.py does to Meta's checkpoints).

GGUF (llama.cpp, lmforge.gguf): the same model under llama.cpp's names, see `state_to_gguf`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lmforge.models.llama.model import LlamaConfig
from lmforge.models.spec import GGUFMap, GGUFShape, HuggingFaceMap

_BLOCK = {  # ours, relative to layers.N -> Hugging Face's, relative to model.layers.N
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_ROOT = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}  # fmt: skip


def _pairs_to_halves(w: Tensor, n_heads: int) -> Tensor:
    """(n_heads * head_dim, in) rows in RoPE pair order -> rotate-half order, head by head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _halves_to_pairs(w: Tensor, n_heads: int) -> Tensor:
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    if cfg.qk_norm:
        raise ValueError("LlamaForCausalLM has no QK-norm (model.qk_norm is true)")
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters, earlier versions rope_theta: both are written.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }


def config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"rope_parameters is {rope!r}, not a mapping")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
        "rope type": (rope_type, "default"),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"{key} is {value!r}; lmforge's llama supports only {supported!r}")
    # head_dim may differ from hidden_size / num_attention_heads (a model with pruned heads, Qwen3).
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_hidden=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim=head_dim,
    )


def state_to_hf(state: Mapping[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    assert cfg.n_kv_heads is not None
    heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in _ROOT:
            out[_ROOT[name]] = tensor.clone()
            continue
        _, layer, rest = name.split(".", 2)  # layers.N.rest
        if rest in heads:
            tensor = _pairs_to_halves(tensor, heads[rest])
        out[f"model.layers.{layer}.{_BLOCK[rest]}"] = tensor.clone()
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def state_from_hf(hf: Mapping[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    assert cfg.n_kv_heads is not None
    root = {theirs: ours for ours, theirs in _ROOT.items()}
    block = {theirs: ours for ours, theirs in _BLOCK.items()}
    heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads}
    out: dict[str, Tensor] = {}
    for name, tensor in hf.items():
        if name in root:
            out[root[name]] = tensor
            continue
        if not name.startswith("model.layers.") or name.split(".", 3)[3] not in block:
            raise ValueError(f"weight '{name}' has no place in lmforge's llama")
        _, _, layer, rest = name.split(".", 3)
        ours = block[rest]
        out[f"layers.{layer}.{ours}"] = _halves_to_pairs(tensor, heads[ours]) if ours in heads else tensor
    if cfg.tie_embeddings:
        out.pop("output.weight", None)  # the checkpoint keeps a tied head under the embedding's name
    return out


def lora_to_hf(name: str, lora_b: Tensor, cfg: LlamaConfig) -> tuple[str, Tensor]:
    """layers.N.attention.wq -> model.layers.N.self_attn.q_proj; q's and k's output rows permuted
    like their weights (the update B A is then permuted like W)."""
    assert cfg.n_kv_heads is not None
    heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads}
    _, layer, rest = name.split(".", 2)
    weight = f"{rest}.weight"
    if weight in heads:
        lora_b = _pairs_to_halves(lora_b, heads[weight])
    return f"model.layers.{layer}.{_BLOCK[weight].removesuffix('.weight')}", lora_b.clone()


# ---------------------------------------------------------------------------- GGUF (llama.cpp)

# llama.cpp's "llama" graph rotates interleaved pairs, as this model does, so wq and wk are written
# as they are (convert_hf_to_gguf.py undoes transformers' permutation to get the same rows). It has
# no QK-norm: a qk_norm model is written as "qwen3", whose graph is this one with an RMSNorm per head
# on q and k before RoPE, but rotates halves (NEOX): its wq, wk rows and q/k-norm weights are then
# permuted as for transformers.
_GGUF_BLOCK = {  # ours, relative to layers.N -> llama.cpp's, relative to blk.N
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "attention.q_norm.weight": "attn_q_norm.weight",
    "attention.k_norm.weight": "attn_k_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_GGUF_ROOT = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}  # fmt: skip


def gguf_shape(cfg: LlamaConfig) -> GGUFShape:
    assert cfg.n_kv_heads is not None and cfg.ffn_hidden is not None  # set by __post_init__
    if cfg.head_dim != cfg.dim // cfg.n_heads:  # llama.cpp would then need attention.key_length
        raise ValueError(f"head_dim {cfg.head_dim} is not dim / n_heads (pruned heads): not written yet")
    return GGUFShape(
        architecture="qwen3" if cfg.qk_norm else "llama",
        context_length=cfg.max_seq_len,
        embedding_length=cfg.dim,
        block_count=cfg.n_layers,
        feed_forward_length=cfg.ffn_hidden,
        head_count=cfg.n_heads,
        head_count_kv=cfg.n_kv_heads,
        norm_eps=cfg.norm_eps,
        rms_norm=True,
        rope_freq_base=cfg.rope_theta,
        rope_dimension_count=cfg.head_dim,
    )


def state_to_gguf(state: Mapping[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    assert cfg.n_kv_heads is not None
    # Rows to put in rotate-half order for qwen3 (a q/k-norm weight is one head's row order).
    halves = (
        {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads,
         "attention.q_norm.weight": 1, "attention.k_norm.weight": 1}
        if cfg.qk_norm
        else {}
    )  # fmt: skip
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in _GGUF_ROOT:
            out[_GGUF_ROOT[name]] = tensor
            continue
        _, layer, rest = name.split(".", 2)  # layers.N.rest
        if rest in halves:
            tensor = _pairs_to_halves(tensor.reshape(tensor.shape[0], -1), halves[rest]).reshape(tensor.shape)
        out[f"blk.{layer}.{_GGUF_BLOCK[rest]}"] = tensor
    if cfg.tie_embeddings:
        out.pop("output.weight", None)  # llama.cpp uses token_embd when output is absent
    return out


HF = HuggingFaceMap(
    architecture="LlamaForCausalLM",
    model_type="llama",
    config_to_hf=config_to_hf,
    config_from_hf=config_from_hf,
    state_to_hf=state_to_hf,
    state_from_hf=state_from_hf,
    lora_to_hf=lora_to_hf,
    gguf=GGUFMap(shape=gguf_shape, state_to_gguf=state_to_gguf),
)
