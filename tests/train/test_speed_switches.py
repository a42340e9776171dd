"""The speed switches of issue 5 change how the model computes, never what: each is checked against
the plain PyTorch path on CPU (fp32, so the tolerances are tight)."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ParallelConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.models import build_model, model_config
from lmforge.models.llama.fused import FusedGateUpFeedForward, FusedQKVAttention
from lmforge.parallel.apply import ModelLayout
from lmforge.train.converters import convert_model
from lmforge.train.fused_projections import apply_fused_projections
from lmforge.train.transforms import apply_transforms

CPU = torch.device("cpu")


def _model(family: str = "llama", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_config(family, "debug", **overrides))


def _loss_and_grads(model: torch.nn.Module, forward=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 33))
    model.zero_grad(set_to_none=True)
    loss = (model if forward is None else forward)(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_projections_match_the_separate_matmuls(qk_norm):
    plain, fused = _model(qk_norm=qk_norm), _model(qk_norm=qk_norm)
    assert apply_fused_projections(fused) == 2 * 2  # attention + feed-forward in each of 2 blocks
    assert isinstance(fused.layers["0"].attention, FusedQKVAttention)
    assert isinstance(fused.layers["1"].feed_forward, FusedGateUpFeedForward)
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints do not change
    loss, grads = _loss_and_grads(plain)
    fused_loss, fused_grads = _loss_and_grads(fused)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_projections_under_bf16_autocast_match_the_separate_matmuls():
    plain, fused = _model(), _model()
    apply_fused_projections(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(plain)
        fused_loss, fused_grads = _loss_and_grads(fused)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-2, atol=1e-2)
    for name, grad in grads.items():
        assert fused_grads[name].dtype == torch.float32  # fp32 weights get fp32 gradients
        relative_error = (fused_grads[name] - grad).norm() / grad.norm()
        assert relative_error < 2e-2, (name, relative_error.item())


def test_fused_projections_keep_the_weights_not_their_concatenation_for_backward():
    # Under FSDP the weights are the gathered parameters FSDP frees after forward; a concatenation
    # saved for backward would hold them whole until then.
    model = _model()
    apply_fused_projections(model)
    attention = model.layers["0"].attention
    stacked_rows = attention.wq.out_features + attention.wk.out_features + attention.wv.out_features
    saved: list[torch.Size] = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        attention.project_qkv(torch.randn(2, 8, model.cfg.dim))
    assert attention.wq.weight.shape in saved  # the parameters themselves are what is kept
    assert (stacked_rows, model.cfg.dim) not in saved


def test_gpt2_has_nothing_to_fuse_and_tp_refuses_the_switch():
    assert apply_fused_projections(_model("gpt2")) == 0
    with pytest.raises(ConfigError, match="train.fused_projections.*parallel.tp=2"):
        convert_model(_model(), TrainConfig(fused_projections=True), tp=2, device=torch.device("cpu"))


def test_qk_norm_adds_one_gain_per_head_dim_and_changes_the_output():
    plain, normed = _model(), _model(qk_norm=True)
    extra = set(normed.state_dict()) - set(plain.state_dict())
    assert extra == {f"layers.{i}.attention.{n}_norm.weight" for i in range(2) for n in "qk"}
    assert normed.layers["0"].attention.q_norm.weight.shape == (normed.cfg.head_dim,)
    tokens = torch.randint(0, 512, (2, 16))
    assert not torch.allclose(normed(tokens), plain(tokens))


@pytest.mark.slow  # inductor on CPU: ~20 s per scope
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_training_step_matches_eager(scope):
    eager, compiled = _model(), _model()
    cfg = TrainConfig(compile=True, compile_scope=scope)
    step_module = apply_transforms(
        compiled, cfg, ParallelConfig(), ModelLayout(), CPU, torch.float32, compile=True
    )
    assert (step_module is compiled) == (scope == "blocks")
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # in place: names unchanged
    loss, grads = _loss_and_grads(eager)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, step_module)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow  # compiles the debug blocks on CPU (~15 s)
def test_pretrain_with_every_switch_stops_at_the_target_loss(debug_config, tmp_path):
    from lmforge.train.metrics import read_metrics
    from lmforge.train.pretrain import pretrain

    run_dir = tmp_path / "run"
    # A first evaluation at step 5 and a target its loss (~6.2 nats at init) cannot miss: the run
    # stops there, with a checkpoint, instead of at max_steps 20. Compiled blocks also generate the
    # sample text (eagerly) at that evaluation.
    cfg = debug_config(
        model={"qk_norm": True},
        train={"compile": True, "fused_projections": True, "eval_every": 5, "target_val_loss": 50.0,
               "sample_tokens": 8},
    )  # fmt: skip
    result = pretrain(cfg, run_dir)
    assert result["step"] == 5
    events = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "target_reached"]
    assert len(events) == 1 and events[0]["step"] == 5 and events[0]["val_loss"] <= 50.0
    assert events[0]["train_time_s"] > 0
    assert (run_dir / "checkpoints" / "step_0000005").is_dir()
    assert not (run_dir / "checkpoints" / "step_0000010").exists()
