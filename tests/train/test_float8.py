"""train.float8 (torchao Float8Linear): which layers it converts, that training still tracks the
high-precision run, and that a machine without float8 hardware gets one clear error line."""

from __future__ import annotations

import pytest
import torch

from lmforge.cli import main
from lmforge.config import OptimConfig
from lmforge.models import build_model, model_config
from lmforge.train.optim import build_optimizer

float8_linear = pytest.importorskip("torchao.float8.float8_linear")


def _train(float8: bool, steps: int = 15) -> list[float]:
    from lmforge.train.float8 import apply_float8

    torch.manual_seed(0)
    model = build_model(model_config("llama", "debug"))
    if float8:
        # 2 blocks x (wq, wk, wv, wo, w1, w2, w3); the output head stays in high precision.
        assert apply_float8(model) == 14
        assert type(model.output) is torch.nn.Linear
        assert isinstance(model.layers["0"].attention.wq, float8_linear.Float8Linear)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3), "cpu")
    torch.manual_seed(1)
    tokens = torch.randint(0, model.cfg.vocab_size, (8, 33))  # one batch, memorised
    losses = []
    for _ in range(steps):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_float8_training_tracks_the_fp32_loss_curve():
    reference, float8 = _train(False), _train(True)
    assert float8 != reference  # the float8 casts did take part
    assert reference[-1] < 0.6 * reference[0]  # it learns (one batch, memorised)
    for step, (a, b) in enumerate(zip(reference, float8, strict=True)):
        assert abs(a - b) <= 0.03 * a, (step, a, b)


def test_float8_on_a_cpu_run_is_one_error_line(tmp_path, capsys):
    code = main(["pretrain", "--config", "recipes/debug.yaml", "--out", str(tmp_path / "run"),
                 "--train.device=cpu", "--train.float8=true"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "train.float8" in err and "compute capability >= 8.9" in err
