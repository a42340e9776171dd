"""Quantization-aware training (lmforge.train.qat): the fake quantizer is on in the forward, the
checkpoint is a plain model's, and converting it is quantizing its weights with the same numbers;
the converted artifact of a `lmforge finetune --qat.scheme` run reloads in a fresh process."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.api import load
from lmforge.cli import main
from lmforge.compress.quantize import linear_config, quantize_checkpoint, quantize_model
from lmforge.config import LoraConfig, QatConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.models import build_model, model_config
from lmforge.rundir import latest_checkpoint, meta_model, model_state_dict, tensor_headers
from lmforge.train.pretrain import pretrain
from lmforge.train.qat import apply_qat, check_qat

SCHEMES = ["int4-weight", "int8-dynamic"]
RECIPE = Path(__file__).parents[2] / "recipes" / "debug.yaml"


def ids() -> torch.Tensor:
    return torch.arange(32).reshape(2, 16) * 11 % 512  # (2, 16)


def in_blocks(module: nn.Module, fqn: str) -> bool:
    return type(module) is nn.Linear and fqn.startswith("layers.")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fake_quantization_changes_the_forward_as_the_converted_model_computes(scheme):
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    plain = build_model(model_config("llama", "debug")).eval()
    prepared = copy.deepcopy(plain)
    assert apply_qat(prepared, QatConfig(scheme=scheme, group_size=32)) == 2 * 7  # 7 linears per block
    assert prepared.state_dict().keys() == plain.state_dict().keys()  # names a plain model loads
    converted = copy.deepcopy(plain)  # PTQ of the same weights, in the blocks, with the scheme's config
    quantize_(converted, linear_config(scheme, 32), filter_fn=in_blocks)
    with torch.no_grad():
        fp32, fake, real = plain(ids()), prepared(ids()), converted(ids())
    assert (fake - fp32).abs().max() > 1e-3  # the fake quantizer is on
    # The fake quantizer rounds as the converted model does: the same logits (int8-dynamic's integer
    # matmul sums in another order).
    torch.testing.assert_close(fake, real, rtol=0, atol=0 if scheme == "int4-weight" else 1e-6)


def test_torchao_convert_is_quantizing_the_weights():
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    torch.manual_seed(0)
    model = build_model(model_config("llama", "debug")).eval()
    apply_qat(model, QatConfig(scheme="int4-weight", group_size=16))
    plain = copy.deepcopy(model)
    quantize_(model, QATConfig(linear_config("int4-weight", 16), step="convert"))  # torchao's convert step
    quantize_model(plain, "int4-weight", 16)  # lmforge compress quantize of a QAT run: affine, not HQQ
    for name, module in model.named_modules():
        if in_blocks(module, name):
            theirs, ours = module.weight, plain.get_submodule(name).weight
            assert torch.equal(theirs.qdata, ours.qdata) and torch.equal(theirs.scale, ours.scale), name


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, session_debug_config, prepared_dir) -> Path:
    """A debug llama pretrained 2 steps, then fine-tuned 2 steps with QAT by the issue's command:
    `lmforge finetune --config FILE --out DIR --init RUN --qat.scheme=int4-weight`."""
    root = tmp_path_factory.mktemp("qat")
    quiet = {"progress": False, "tensorboard": False, "plot": False}
    train = {"max_steps": 2, "eval_every": 0, "sample_tokens": 0}
    pretrain(session_debug_config(train=train, logging=quiet), root / "base")
    finetune = ["finetune", "--config", str(RECIPE), "--out", str(root / "run"), "--init", str(root / "base"),
                "--qat.scheme=int4-weight", "--qat.group_size=16", f"--data.dir={prepared_dir}",
                "--train.max_steps=2", "--train.eval_every=0", "--train.sample_tokens=0",
                "--logging.progress=false", "--logging.tensorboard=false", "--logging.plot=false"]  # fmt: skip
    assert main(finetune) == 0
    return root / "run"


def test_a_qat_run_saves_a_plain_model_and_quantizes_with_its_group_size(qat_run, tmp_path):
    ckpt = latest_checkpoint(qat_run)
    assert set(tensor_headers(ckpt / "model")) == set(model_state_dict(meta_model(ckpt)))
    model, _ = load(qat_run)  # a plain model: nothing fake-quantized
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    out = tmp_path / "int4"
    assert main(["compress", "quantize", str(qat_run), "--scheme", "int4-weight", "--out", str(out)]) == 0
    quantized, _ = load(out)
    assert quantized.layers["0"].attention.wq.weight.block_size == (1, 16)  # qat.group_size by default
    # The converted model computes what the trained one computed with its fake quantizer on (the
    # blocks; the embedding and head are quantized only by the convert step).
    prepared = copy.deepcopy(model)
    apply_qat(prepared, QatConfig(scheme="int4-weight", group_size=16))
    prepared.tok_embeddings, prepared.output = quantized.tok_embeddings, quantized.output
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids()), prepared(ids()), rtol=0, atol=1e-5)


def test_the_converted_run_reloads_in_a_fresh_process_with_the_same_logits(
    qat_run, tmp_path, logits_in_a_fresh_process
):
    out = tmp_path / "int4"
    assert main(["compress", "quantize", str(qat_run), "--scheme", "int4-weight", "--out", str(out)]) == 0
    [reloaded] = logits_in_a_fresh_process([out], ids())
    in_memory, cfg = quantize_checkpoint(latest_checkpoint(qat_run), "int4-weight")
    assert cfg.train.init == str(latest_checkpoint(qat_run.parent / "base").resolve())  # a fine-tune
    assert (cfg.qat.scheme, cfg.compress.group_size) == ("int4-weight", 16)  # with QAT, converted
    with torch.no_grad():
        expected = in_memory(ids())
        trained = load(qat_run)[0](ids())
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-6)
    assert (expected - trained).abs().max() > 1e-3  # quantized, not the trained fp32 weights


@pytest.mark.parametrize(
    ("train", "lora", "tp", "pp", "key"),
    [
        ({"fused_projections": True}, 0, 1, 1, "train.fused_projections"),
        ({"float8": True}, 0, 1, 1, "train.float8"),
        ({}, 4, 1, 1, "lora.rank"),
        ({}, 0, 2, 1, "parallel.tp"),
        ({}, 0, 1, 2, "parallel.pp"),
    ],
)
def test_transforms_it_does_not_compose_with_are_refused(train, lora, tp, pp, key):
    with pytest.raises(ConfigError, match=f"'qat.scheme' \\(int4-weight\\) is not supported with {key}"):
        check_qat(QatConfig(scheme="int4-weight"), TrainConfig(**train), LoraConfig(rank=lora), tp, pp)
    check_qat(QatConfig(), TrainConfig(**train), LoraConfig(rank=lora), tp, pp)  # no QAT: nothing to refuse
