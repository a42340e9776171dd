"""GPT-2 <-> Hugging Face transformers' GPT2LMHeadModel: config.json keys and weight names.

Names: wte, wpe, h.N.*, ln_f -> transformer.wte, transformer.wpe, transformer.h.N.*, transformer.ln_f;
the head is tied to wte on both sides (transformers ties it itself, so it is not written).

Layouts: transformers keeps OpenAI's Conv1D weights, (in_features, out_features), the transpose of
nn.Linear's; and its c_attn rows are [all q; all k; all v], ours per head (q, k, v) (see model.py):
ours = theirs.view(3, n_heads, head_dim, ...).transpose(0, 1). A model built with bias=False is
written with zero biases, which computes the same.

GGUF (llama.cpp, lmforge.gguf): the same model under llama.cpp's names, see `state_to_gguf`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lmforge.models.gpt2.model import GPT2Config
from lmforge.models.spec import GGUFMap, GGUFShape, HuggingFaceMap

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Every tensor of a block, as transformers names them (relative to transformer.h.N).
_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
          "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
          "mlp.c_proj.weight", "mlp.c_proj.bias")  # fmt: skip
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # the same function: GELU's tanh approximation


def _heads_to_blocks(t: Tensor, n_heads: int) -> Tensor:
    """c_attn rows (or bias) (n_heads, 3, head_dim) -> transformers' (3, n_heads, head_dim)."""
    return t.reshape(n_heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _blocks_to_heads(t: Tensor, n_heads: int) -> Tensor:
    return t.reshape(3, n_heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def config_to_hf(cfg: GPT2Config) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
    }


def config_from_hf(hf: Mapping[str, Any]) -> GPT2Config:
    dim = hf["n_embd"]
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") in _GELU_TANH, "gelu_new"),
        "n_inner": (hf.get("n_inner") in (None, 4 * dim), f"None or {4 * dim}"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, True),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False) is False, False),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True) is True, True),
    }
    for key, (ok, supported) in unsupported.items():
        if not ok:
            raise ValueError(f"{key} is {hf.get(key)!r}; lmforge's gpt2 supports only {supported!r}")
    return GPT2Config(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["n_positions"],
        dim=dim,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        bias=True,
        dropout=float(hf.get("resid_pdrop", 0.0)),
    )


def state_to_hf(state: Mapping[str, Tensor], cfg: GPT2Config) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied to wte (a pipeline's last stage saves its copy under wte's name anyway)
        if not name.startswith("h."):
            out[f"transformer.{name}"] = tensor.clone()
            continue
        _, layer, rest = name.split(".", 2)
        if rest.startswith("attn.c_attn."):
            tensor = _heads_to_blocks(tensor, cfg.n_heads)
        out[f"transformer.h.{layer}.{rest}"] = tensor.t().contiguous() if rest in _CONV1D else tensor.clone()
    for index in range(cfg.n_layers):  # bias=False: zero biases compute the same
        prefix = f"transformer.h.{index}."
        for bias in (b for b in _BLOCK if b.endswith(".bias") and prefix + b not in out):
            weight_name = bias.removesuffix(".bias") + ".weight"
            weight = out[prefix + weight_name]
            width = weight.shape[1] if weight_name in _CONV1D else weight.shape[0]  # output features
            out[prefix + bias] = torch.zeros(width, dtype=weight.dtype)
    if "transformer.ln_f.bias" not in out:
        out["transformer.ln_f.bias"] = torch.zeros_like(out["transformer.ln_f.weight"])
    return out


def state_from_hf(hf: Mapping[str, Tensor], cfg: GPT2Config) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    # Names as state_to_hf writes them: lmforge.hf.import_hf drops a tied head and old checkpoints'
    # causal-mask buffers before it calls this.
    for name, tensor in hf.items():
        if not name.startswith("transformer."):
            raise ValueError(f"weight '{name}' has no place in lmforge's gpt2")
        ours = name.removeprefix("transformer.")
        if ours.startswith("h."):
            _, layer, rest = ours.split(".", 2)
            if rest not in _BLOCK:
                raise ValueError(f"weight '{name}' has no place in lmforge's gpt2")
            tensor = tensor.t() if rest in _CONV1D else tensor
            if rest.startswith("attn.c_attn."):
                tensor = _blocks_to_heads(tensor, cfg.n_heads)
            out[f"h.{layer}.{rest}"] = tensor.contiguous()
        else:
            out[ours] = tensor
    return out


def lora_to_hf(name: str, lora_b: Tensor, cfg: GPT2Config) -> tuple[str, Tensor]:
    """h.N.attn.c_attn -> transformer.h.N.attn.c_attn, c_attn's output rows in transformers' order."""
    if name.endswith("attn.c_attn"):
        lora_b = _heads_to_blocks(lora_b, cfg.n_heads)
    return f"transformer.{name}", lora_b.clone()


# ---------------------------------------------------------------------------- GGUF (llama.cpp)

# llama.cpp's "gpt2" graph: learned positions, LayerNorms with biases, GELU (tanh approximation),
# the head tied to token_embd. Its attn_qkv rows are GPT-2's [q; k; v] blocks, in nn.Linear's
# (out, in) layout (GGUF's), so only c_attn's rows are reordered. It needs every bias: a model built
# with bias=False gets zeros, which compute the same.
_GGUF_BLOCK = {  # ours, relative to h.N (without .weight / .bias) -> llama.cpp's, relative to blk.N
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_GGUF_ROOT = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}


def gguf_shape(cfg: GPT2Config) -> GGUFShape:
    return GGUFShape(
        architecture="gpt2",
        context_length=cfg.max_seq_len,
        embedding_length=cfg.dim,
        block_count=cfg.n_layers,
        feed_forward_length=4 * cfg.dim,
        head_count=cfg.n_heads,
        head_count_kv=cfg.n_heads,
        norm_eps=cfg.norm_eps,
        rms_norm=False,
    )


def state_to_gguf(state: Mapping[str, Tensor], cfg: GPT2Config) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied to wte
        module, kind = name.rsplit(".", 1)  # kind: weight or bias
        if module in _GGUF_ROOT:
            out[f"{_GGUF_ROOT[module]}.{kind}"] = tensor
            continue
        _, layer, rest = module.split(".", 2)  # h.N.rest
        if rest == "attn.c_attn":
            tensor = _heads_to_blocks(tensor, cfg.n_heads)
        out[f"blk.{layer}.{_GGUF_BLOCK[rest]}.{kind}"] = tensor
    # bias=False: zero biases, one per weight that is not an embedding (its output width)
    weights = [n for n in out if n.endswith(".weight") and not n.startswith(("token_embd", "position_embd"))]
    for name in weights:
        bias = name.removesuffix(".weight") + ".bias"
        if bias not in out:
            out[bias] = torch.zeros(out[name].shape[0], dtype=out[name].dtype)
    return out


HF = HuggingFaceMap(
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    config_to_hf=config_to_hf,
    config_from_hf=config_from_hf,
    state_to_hf=state_to_hf,
    state_from_hf=state_from_hf,
    lora_to_hf=lora_to_hf,
    fan_in_fan_out=True,
    gguf=GGUFMap(shape=gguf_shape, state_to_gguf=state_to_gguf),
)
