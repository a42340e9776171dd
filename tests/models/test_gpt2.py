"""GPT-2-specific tests: config validation, parameter names, weight tying, bias option, dropout,
parity with an independent plain-ops reference, parameter and FLOP counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.models import build_model, model_config
from lmforge.models.gpt2.model import GPT2, GPT2Config


def _debug(seed: int = 0, **overrides: object) -> GPT2:
    torch.manual_seed(seed)
    model = build_model(model_config("gpt2", "debug", **overrides))
    assert isinstance(model, GPT2)
    return model


# --- config -------------------------------------------------------------------------------------------


def test_config_round_trips_through_asdict() -> None:
    cfg = model_config("gpt2", "124m")
    assert cfg.head_dim == 64
    assert GPT2Config(**dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dim": 100, "n_heads": 3}, "dim=100.*n_heads=3"),
        ({"n_heads": 0}, "n_heads"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, message: str) -> None:
    fields = dict(vocab_size=16, max_seq_len=8, dim=64, n_layers=2, n_heads=4) | overrides
    with pytest.raises(ValueError, match=message):
        GPT2Config(**fields)


# --- structure ----------------------------------------------------------------------------------------


def test_parameter_names_and_tied_head() -> None:
    model = _debug()
    per_layer = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    expected = ["wte.weight", "wpe.weight"]
    for i in range(model.cfg.n_layers):
        expected += [f"h.{i}.{module}.{kind}" for module in per_layer for kind in ("weight", "bias")]
    expected += ["ln_f.weight", "ln_f.bias", "lm_head.weight"]
    assert list(model.state_dict()) == expected
    assert model.lm_head.weight is model.wte.weight
    # nn.Linear layout (out, in), not Hugging Face's Conv1D (in, out).
    assert model.h["0"].attn.c_attn.weight.shape == (3 * 64, 64)
    assert model.h["0"].mlp.c_fc.weight.shape == (4 * 64, 64)


def test_tied_head_trains_as_one_matrix() -> None:
    model = _debug()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 8))
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    optimizer.step()
    assert torch.equal(model.lm_head.weight, model.wte.weight)


def test_no_bias_option() -> None:
    model = _debug(bias=False)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.num_params() < _debug().num_params()
    assert torch.isfinite(model(torch.randint(0, 512, (1, 8)))).all()


def test_dropout_only_in_training() -> None:
    model = _debug(dropout=0.2)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


# --- parity with an independent reference ------------------------------------------------------------


def _reference_forward(model: GPT2, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2 written out with plain ops: explicit LayerNorm, masked softmax, tanh-GELU formula."""
    cfg = model.cfg
    B, T = idx.shape
    H, hd = cfg.n_heads, cfg.head_dim

    def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
        mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + cfg.norm_eps) * ln.weight + ln.bias

    def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
        return x @ layer.weight.T + layer.bias

    future = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    x = model.wte.weight[idx] + model.wpe.weight[:T]
    for block in model.h.values():
        # c_attn's rows are interleaved per head: (H, 3, hd), see the model's docstring.
        q, k, v = linear(layer_norm(x, block.ln_1), block.attn.c_attn).view(B, T, H, 3, hd).unbind(3)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + future
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * hd)
        x = x + linear(out, block.attn.c_proj)
        x = x + linear(gelu_tanh(linear(layer_norm(x, block.ln_2), block.mlp.c_fc)), block.mlp.c_proj)
    return layer_norm(x, model.ln_f) @ model.wte.weight.T


def test_matches_reference_implementation() -> None:
    model = _debug()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:  # non-zero, so the reference checks them too
                param.add_(0.1 * torch.randn_like(param))
            if name.endswith("c_fc.weight"):  # pre-activations of order 1, where tanh-GELU != erf-GELU
                param.mul_(20)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), _reference_forward(model, idx), atol=1e-5, rtol=1e-5)


# --- counts -------------------------------------------------------------------------------------------


def test_num_params_and_flops_by_hand() -> None:
    model = _debug()
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.dim, cfg.n_layers, cfg.n_heads) == (512, 64, 64, 2, 4)
    V, T_max, d, L, H, hd = 512, 64, 64, 2, 4, 16
    per_layer = (
        2 * 2 * d  # ln_1, ln_2 weight + bias
        + d * 3 * d + 3 * d  # c_attn
        + d * d + d  # attn.c_proj
        + d * 4 * d + 4 * d  # c_fc
        + 4 * d * d + d  # mlp.c_proj
    )  # fmt: skip
    n_matmul = L * per_layer + 2 * d + V * d  # + ln_f + the tied wte / lm_head, counted once
    assert model.num_params() == n_matmul + T_max * d  # + wpe
    assert model.num_params(exclude_embeddings=True) == n_matmul
    assert model.flops_per_token() == 6 * n_matmul + 12 * L * H * hd * T_max
    assert model.flops_per_token(seq_len=16) == 6 * n_matmul + 12 * L * H * hd * 16
