"""Properties every model family must have: causality, KV-cache parity, meta-device builds, init,
flavor sizes, the family table helpers, and that the model can learn."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F

from lmforge.models import FAMILIES, KVCache, build_model, model_config

FAMILY_NAMES = list(FAMILIES)
# Causality and the KV cache are the decoders'; the encoder (bert) sees every position and does not
# generate (tests/models/test_bert.py).
DECODERS = [name for name, spec in FAMILIES.items() if not spec.encoder]


def _debug_model(family: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(model_config(family, "debug", **overrides))


def _tokens(model: torch.nn.Module, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=generator)


# --- forward ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_forward_shape_and_dtype(family: str) -> None:
    model = _debug_model(family)
    idx = _tokens(model, 2, 10)
    logits = model(idx)
    assert logits.shape == (2, 10, model.cfg.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # The model computes in its own dtype and does not upcast the logits (the trainer does).
    assert model.to(torch.bfloat16)(idx).dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sequence_longer_than_max_seq_len_is_rejected(family: str) -> None:
    model = _debug_model(family)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(model, 1, model.cfg.max_seq_len + 1))


@pytest.mark.parametrize("family", DECODERS)
def test_causal_masking(family: str) -> None:
    model = _debug_model(family).eval()
    idx = _tokens(model, 2, 16)
    t = 6
    changed = idx.clone()
    changed[:, t + 1 :] = (idx[:, t + 1 :] + 1) % model.cfg.vocab_size  # every later token differs
    with torch.no_grad():
        logits, logits_changed = model(idx), model(changed)
    # Positions <= t cannot see the future ...
    torch.testing.assert_close(logits_changed[:, : t + 1], logits[:, : t + 1], atol=1e-6, rtol=0)
    # ... and the change does reach the later positions (so the comparison above is not vacuous).
    assert (logits_changed[:, t + 1 :] - logits[:, t + 1 :]).abs().max() > 1e-3


# --- KV cache -----------------------------------------------------------------------------------------


def test_kv_cache_update_writes_positions_and_masks() -> None:
    cache = KVCache(batch_size=2, n_kv_heads=3, max_seq_len=8, head_dim=4)
    assert cache.k_cache.shape == cache.v_cache.shape == (2, 3, 8, 4)
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k_all, v_all = cache.update(torch.tensor([3, 4]), k, v)
    assert k_all.shape == (2, 3, 8, 4)
    torch.testing.assert_close(k_all[:, :, 3:5], k)
    torch.testing.assert_close(v_all[:, :, 3:5], v)
    assert k_all[:, :, :3].abs().sum() == 0 and k_all[:, :, 5:].abs().sum() == 0
    mask = cache.causal_mask(torch.tensor([3, 4]))
    assert mask.shape == (2, 8) and mask.dtype == torch.bool
    assert mask[0].tolist() == [True] * 4 + [False] * 4
    assert mask[1].tolist() == [True] * 5 + [False] * 3
    assert cache.state_dict() == {}  # inference state, never checkpointed


def test_kv_cache_casts_to_its_dtype() -> None:
    cache = KVCache(1, 1, 4, 2, dtype=torch.bfloat16)
    assert cache.k_cache.dtype == cache.v_cache.dtype == torch.bfloat16
    k_all, v_all = cache.update(torch.tensor([0]), torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
    assert k_all.dtype == v_all.dtype == torch.bfloat16


@pytest.mark.parametrize("field", ["batch_size", "n_kv_heads", "max_seq_len", "head_dim"])
@pytest.mark.parametrize("value", [0, -1])
def test_kv_cache_refuses_a_size_that_is_not_positive_by_name(field, value) -> None:
    sizes = {"batch_size": 1, "n_kv_heads": 1, "max_seq_len": 4, "head_dim": 2, field: value}
    with pytest.raises(ValueError, match=f"KVCache {field} must be positive, got {value}"):
        KVCache(**sizes)


@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_prefill_then_decode_matches_full_forward(family: str) -> None:
    model = _debug_model(family).eval()
    idx = _tokens(model, 2, 20)
    prompt_len = 7
    with torch.no_grad():
        full = model(idx)  # (2, 20, vocab)
        model.setup_kv_cache(batch_size=2, max_seq_len=32)
        prefill = model(idx[:, :prompt_len], input_pos=torch.arange(prompt_len))
        torch.testing.assert_close(prefill, full[:, :prompt_len], atol=1e-5, rtol=0)
        for t in range(prompt_len, idx.size(1)):
            step = model(idx[:, t : t + 1], input_pos=torch.tensor([t]))
            torch.testing.assert_close(step, full[:, t : t + 1], atol=1e-5, rtol=0)

        # A prompt prefilled in two chunks into a fresh cache gives the same logits.
        model.setup_kv_cache(batch_size=2, max_seq_len=32)
        model(idx[:, :4], input_pos=torch.arange(4))
        chunk = model(idx[:, 4:prompt_len], input_pos=torch.arange(4, prompt_len))
        torch.testing.assert_close(chunk, full[:, 4:prompt_len], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_clear_kv_cache_restores_training(family: str) -> None:
    model = _debug_model(family)
    idx = _tokens(model, 2, 12)
    with torch.no_grad():
        reference = model(idx)
    model.setup_kv_cache(batch_size=2, max_seq_len=16)
    assert sum(isinstance(m, KVCache) for m in model.modules()) == model.cfg.n_layers
    with torch.no_grad():
        model(idx[:, :5], input_pos=torch.arange(5))
    model.clear_kv_cache()
    assert not any(isinstance(m, KVCache) for m in model.modules())
    assert set(model.state_dict()) == set(_debug_model(family).state_dict())  # caches never saved

    model.train()
    logits = model(idx)
    torch.testing.assert_close(logits.detach(), reference, atol=1e-6, rtol=0)
    loss = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_longer_than_max_seq_len_is_rejected(family: str) -> None:
    model = _debug_model(family)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_kv_cache(batch_size=1, max_seq_len=model.cfg.max_seq_len + 1)


# --- meta-device builds and init ---------------------------------------------------------------------

# Published sizes: Llama 2 7B (6.74B, Touvron et al. 2023), Llama 3 70B (70.6B, model card), Llama
# 3.2 1B (1.24B, model card), GPT-2 small 124M / medium 355M (counted as in nanoGPT), GPT-3 XL 1.3B,
# 6.7B and 175B (Brown et al. 2020). The 175b Llama and 70b GPT-2 are our own shapes (see flavors.py).
PUBLISHED_SIZES = [
    ("llama", "1b", 1.24e9),
    ("llama", "7b", 6.74e9),
    ("llama", "70b", 7.06e10),
    ("llama", "175b", 1.75e11),
    ("gpt2", "124m", 1.24e8),
    ("gpt2", "350m", 3.55e8),
    ("gpt2", "1b", 1.3e9),
    ("gpt2", "7b", 6.7e9),
    ("gpt2", "70b", 6.49e10),
    ("gpt2", "175b", 1.75e11),
]


@pytest.mark.parametrize(("family", "flavor", "published"), PUBLISHED_SIZES)
def test_meta_build_allocates_nothing_and_matches_published_size(
    family: str, flavor: str, published: float
) -> None:
    start = time.perf_counter()
    model = build_model(model_config(family, flavor), device="meta")
    assert time.perf_counter() - start < 20
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert model.num_params() == pytest.approx(published, rel=0.03)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_meta_then_init_weights_equals_build_model(family: str) -> None:
    cfg = model_config(family, "debug")
    model_cls = FAMILIES[family].model
    torch.manual_seed(0)
    built = build_model(cfg)
    torch.manual_seed(0)
    with torch.device("meta"):
        lazy = model_cls(cfg)
    lazy.to_empty(device="cpu")
    lazy.init_weights()

    built_state, lazy_state = built.state_dict(), lazy.state_dict()
    assert built_state.keys() == lazy_state.keys()
    for name in built_state:
        assert torch.equal(built_state[name], lazy_state[name]), name
    idx = _tokens(built, 2, 8)
    logits = lazy(idx)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, built(idx))
    # Tied weights survive the meta -> to_empty round trip (to_empty alone unties them).
    assert lazy.num_params() == built.num_params()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_init_weights_covers_every_parameter_and_buffer(family: str) -> None:
    model = _debug_model(family, seed=0)
    expected = {name: t.clone() for name, t in model.state_dict().items()}
    expected_buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, expected_buffers[name]), name


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_residual_projections_are_scaled_down(family: str) -> None:
    torch.manual_seed(0)
    model = build_model(model_config(family, "tiny", vocab_size=512))
    out_std = 0.02 / (2 * model.cfg.n_layers) ** 0.5
    for name, param in model.named_parameters():
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "c_proj.weight", ".proj.weight")):
            assert param.std().item() == pytest.approx(out_std, rel=0.05), name
        elif param.dim() == 2:
            assert param.std().item() == pytest.approx(0.02, rel=0.05), name


# --- flavors and the family table ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_flavor_table_sizes(family: str) -> None:
    flavors = FAMILIES[family].flavors
    # The decoders share one ladder of sizes; the encoder has BERT's two published ones.
    sizes = ["base", "large"] if FAMILIES[family].encoder else ["124m", "350m", "1b", "7b", "70b", "175b"]
    assert list(flavors) == ["debug", "tiny", *sizes]
    debug = build_model(model_config(family, "debug"), device="meta")
    assert debug.num_params() < 1_000_000
    tiny_cfg = model_config(family, "tiny")
    assert tiny_cfg.vocab_size == 8192
    assert 5_000_000 <= build_model(tiny_cfg, device="meta").num_params() <= 20_000_000


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_model_config_overrides_copy_and_validate(family: str) -> None:
    flavor_table = FAMILIES[family].flavors
    before = dataclasses.replace(flavor_table["debug"])
    cfg = model_config(family, "debug", n_layers=3, max_seq_len=128)
    assert (cfg.n_layers, cfg.max_seq_len) == (3, 128)
    assert flavor_table["debug"] == before  # the table is not modified
    assert cfg is not flavor_table["debug"]
    with pytest.raises(ValueError, match="n_heads"):
        model_config(family, "debug", n_heads=5)  # 64 is not divisible by 5


def test_model_config_unknown_names() -> None:
    with pytest.raises(ValueError, match="gpt2.*llama"):
        model_config("mamba", "debug")
    with pytest.raises(ValueError, match="debug"):
        model_config("llama", "3b")
    with pytest.raises(ValueError, match="n_layer"):
        model_config("gpt2", "debug", n_layer=3)  # typo of n_layers


def test_build_model_rejects_unknown_config() -> None:
    with pytest.raises(ValueError, match="config type"):
        build_model(object())  # type: ignore[arg-type]


# --- learning -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_short_training_run_drives_loss_down(family: str) -> None:
    model = _debug_model(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = _tokens(model, 4, 33)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    losses = []
    for _ in range(20):
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Near-uniform predictions at init (ln 512 = 6.24), then the repeated batch gets memorised.
    assert losses[0] == pytest.approx(6.24, abs=0.2)
    assert losses[-1] < 0.6 * losses[0]


# --- GPU ----------------------------------------------------------------------------------------------


def _compiled_bf16_matches_eager(family: str, device: str) -> None:
    """Compiled bf16-autocast forward/backward vs the fp32 eager model, within bf16 tolerance."""
    model = _debug_model(family).to(device)
    compiled = torch.compile(model)
    idx = _tokens(model, 4, 64).to(device)
    targets = torch.roll(idx, -1, dims=1)

    def run(forward: torch.nn.Module, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = forward(idx)
        assert logits.dtype == (torch.bfloat16 if autocast else torch.float32)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        return logits.float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_logits, eager_grads = run(model, autocast=False)
    compiled_logits, compiled_grads = run(compiled, autocast=True)
    torch.testing.assert_close(compiled_logits, eager_logits, atol=2e-2, rtol=5e-2)
    for name, grad in eager_grads.items():
        relative_error = (compiled_grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert relative_error < 5e-2, (name, relative_error.item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_compiled_bf16_matches_eager_on_gpu(family: str) -> None:
    _compiled_bf16_matches_eager(family, "cuda")
