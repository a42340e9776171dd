"""Llama-specific tests: config validation, parameter names, parity with an independent reference
written in Meta's complex-number RoPE formulation, GQA, RoPE tables, parameter and FLOP counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.models import build_model, model_config
from lmforge.models.llama.model import Llama, LlamaConfig


def _debug(seed: int = 0, **overrides: object) -> Llama:
    torch.manual_seed(seed)
    model = build_model(model_config("llama", "debug", **overrides))
    assert isinstance(model, Llama)
    return model


# --- config -------------------------------------------------------------------------------------------


def test_config_derives_ffn_hidden_the_llama_way() -> None:
    # Llama-2-7B: 2/3 * 4 * 4096 = 10922 -> next multiple of 256 = 11008 (Meta's params).
    assert LlamaConfig(vocab_size=32000, max_seq_len=8, dim=4096, n_layers=1, n_heads=32).ffn_hidden == 11008
    cfg = LlamaConfig(vocab_size=10, max_seq_len=8, dim=768, n_layers=1, n_heads=12)
    assert cfg.ffn_hidden == 2048 and cfg.n_kv_heads == 12 and cfg.head_dim == 64
    assert (
        LlamaConfig(vocab_size=10, max_seq_len=8, dim=64, n_layers=1, n_heads=4, ffn_hidden=100).ffn_hidden
        == 100
    )


def test_config_round_trips_through_asdict() -> None:
    cfg = model_config("llama", "1b")
    assert LlamaConfig(**dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dim": 100, "n_heads": 3}, "dim=100.*n_heads=3"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads=3"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"dim": 12, "n_heads": 4}, "head_dim=3"),  # RoPE needs an even head_dim
        ({"rope_theta": 0.0}, "rope_theta"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, message: str) -> None:
    fields = dict(vocab_size=16, max_seq_len=8, dim=64, n_layers=2, n_heads=4) | overrides
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**fields)


# --- structure ----------------------------------------------------------------------------------------


def test_parameter_names_and_no_biases() -> None:
    model = _debug()
    names = list(model.state_dict())
    per_layer = [
        "attention_norm.weight",
        "attention.wq.weight",
        "attention.wk.weight",
        "attention.wv.weight",
        "attention.wo.weight",
        "ffn_norm.weight",
        "feed_forward.w1.weight",
        "feed_forward.w2.weight",
        "feed_forward.w3.weight",
    ]
    expected = ["tok_embeddings.weight"]
    expected += [f"layers.{i}.{name}" for i in range(model.cfg.n_layers) for name in per_layer]
    expected += ["norm.weight", "output.weight"]
    assert names == expected  # RoPE tables are buffers but not persistent: not in the state dict
    assert {name for name, _ in model.named_buffers()} == {"rope_cos", "rope_sin"}
    assert model.output.weight is not model.tok_embeddings.weight  # untied by default


def test_tied_embeddings_count_once() -> None:
    untied, tied = _debug(), _debug(tie_embeddings=True)
    vocab_by_dim = untied.cfg.vocab_size * untied.cfg.dim
    assert tied.output.weight is tied.tok_embeddings.weight
    assert tied.num_params() == untied.num_params() - vocab_by_dim
    # Tied, the matrix is also the output matmul, so it stays in the FLOP count's N.
    assert tied.num_params(exclude_embeddings=True) == tied.num_params()
    assert untied.num_params(exclude_embeddings=True) == untied.num_params() - vocab_by_dim


def test_rope_tables_are_fp32_and_exact() -> None:
    model = _debug()
    cfg = model.cfg
    assert model.rope_cos.dtype == torch.float32
    assert model.rope_cos.shape == (cfg.max_seq_len, cfg.head_dim // 2)
    position, pair = 37, 3
    angle = position * cfg.rope_theta ** (-2 * pair / cfg.head_dim)
    assert model.rope_cos[position, pair].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert model.rope_sin[position, pair].item() == pytest.approx(math.sin(angle), abs=1e-6)


# --- parity with an independent reference ------------------------------------------------------------


def _reference_forward(model: Llama, idx: torch.Tensor) -> torch.Tensor:
    """Llama written out with plain ops, RoPE as complex multiplication (Meta's reference code)."""
    cfg = model.cfg
    B, T = idx.shape
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x: torch.Tensor) -> torch.Tensor:  # (B, T, heads, hd)
        x_complex = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(x_complex * freqs_cis[None, :, None, :]).flatten(3)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    future = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    h = model.tok_embeddings.weight[idx]
    for layer in model.layers.values():
        attn, ffn = layer.attention, layer.feed_forward
        x = rms_norm(h, layer.attention_norm.weight)
        q = rope((x @ attn.wq.weight.T).view(B, T, H, hd))
        k = rope((x @ attn.wk.weight.T).view(B, T, KV, hd)).repeat_interleave(H // KV, dim=2)
        v = (x @ attn.wv.weight.T).view(B, T, KV, hd).repeat_interleave(H // KV, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + future
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * hd)
        h = h + out @ attn.wo.weight.T
        x = rms_norm(h, layer.ffn_norm.weight)
        h = h + (F.silu(x @ ffn.w1.weight.T) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    return rms_norm(h, model.norm.weight) @ model.output.weight.T


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_matches_reference_implementation(n_kv_heads: int) -> None:
    model = _debug(n_kv_heads=n_kv_heads)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), _reference_forward(model, idx), atol=1e-5, rtol=1e-5)


# --- counts -------------------------------------------------------------------------------------------


def test_num_params_and_flops_by_hand() -> None:
    model = _debug()
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (512, 64, 2, 4, 2)
    V, d, L, H, hd, ffn = 512, 64, 2, 4, 16, cfg.ffn_hidden
    kv_dim = 2 * hd
    per_layer = d * d + 2 * d * kv_dim + d * d + 3 * d * ffn + 2 * d  # wq, wk+wv, wo, w1-3, norms
    n_matmul = L * per_layer + d + V * d  # + final norm + untied output head
    assert model.num_params() == n_matmul + V * d  # + the input embedding
    assert model.num_params(exclude_embeddings=True) == n_matmul
    assert model.flops_per_token() == 6 * n_matmul + 12 * L * H * hd * cfg.max_seq_len
    assert model.flops_per_token(seq_len=16) == 6 * n_matmul + 12 * L * H * hd * 16
