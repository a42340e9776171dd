"""Quantization-aware training (`qat.scheme`), by torchao: the linear layers inside the blocks
fake-quantize in the forward pass, so fine-tuning learns weights that survive the scheme.

torchao's `QATConfig` prepare step swaps each of those nn.Linear layers for a FakeQuantizedLinear: an
nn.Linear (same `weight`, same name: the checkpoint loads as a plain model) whose forward rounds the
weight to the scheme's grid and back (straight-through gradients), and for int8-dynamic each token's
activations too:

    int4-weight    weights: int4, symmetric, one scale per group of qat.group_size inputs
                   (the fake quantizer torchao infers from IntxWeightOnlyConfig, the PTQ config that
                   `lmforge compress quantize` then applies: the same numbers)
    int8-dynamic   weights: int8, symmetric, one scale per output channel; activations: int8,
                   asymmetric, one scale and zero point per token (torchao fake-quantizes per-token
                   activations only asymmetrically; the int8-dynamic scheme quantizes them so too)

The convert step is `lmforge compress quantize` of the run: the base config applied to the trained
weights, which is what QATConfig(step="convert") does after swapping the layers back.

Left out, as in PTQ's float8 training: the token embedding and the output head, which the compress
step quantizes after training. The fused loss multiplies by the head's weight directly, so a
fake-quantized head would not be seen in training; a tied embedding would be untied by the swap.

Why step 1 of lmforge.train.transforms (a module swap, with the float8 and fused-projection swaps):
every later transform must see the final modules. It does not compose with those two swaps, LoRA
(which wraps plain nn.Linear layers), tensor parallelism (DTensor weights sharded by rows, whose
groups would be chosen per shard) or pipeline stages (not tested): each is refused in one line.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import LoraConfig, QatConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.models import spec_of
from lmforge.runtime import quiet_torchao


def qat_configs(qat: QatConfig):
    """torchao's QATConfig for the prepare step of `qat.scheme`."""
    try:
        with quiet_torchao():
            from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup
            from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except ImportError:
        raise ConfigError("config key 'qat.scheme' needs torchao: pip install 'torchao>=0.18'") from None
    if qat.scheme == "int4-weight":
        # The PTQ config of lmforge.compress.quantize for int4-weight converted from a QAT run (plain
        # affine scales); torchao infers the fake quantizer from it.
        return QATConfig(
            IntxWeightOnlyConfig(
                weight_dtype=torch.int4,  # type: ignore[attr-defined]  # not in torch's stubs
                granularity=PerGroup(qat.group_size),
            )
        )
    assert qat.scheme == "int8-dynamic", qat.scheme
    return QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int8, PerAxis(0), is_symmetric=True),
        step="prepare",
    )


def check_qat(qat: QatConfig, train: TrainConfig, lora: LoraConfig, tp: int, pp: int) -> None:
    """ConfigError (one line) where qat.scheme meets a transform it does not compose with."""
    if qat.scheme == "none":
        return
    clashes = {
        "train.float8": train.float8,
        "train.fused_projections": train.fused_projections,
        "lora.rank": bool(lora.rank),
        "parallel.tp": tp > 1,
        "parallel.pp": pp > 1,
    }
    for key, clash in clashes.items():
        if clash:
            raise ConfigError(
                f"config key 'qat.scheme' ({qat.scheme}) is not supported with {key} (QAT swaps the plain nn.Linear "
                "layers of whole-weight models)"
            )


def apply_qat(model: nn.Module, qat: QatConfig) -> int:
    """Swap the linear layers inside the blocks for torchao's fake-quantized ones in place (before
    freezing, LoRA, TP, compile and FSDP); returns how many were swapped."""
    if qat.scheme == "none":
        return 0
    in_blocks = f"{spec_of(model).blocks}."
    width_ok = qat.scheme != "int4-weight" or all(
        m.in_features % qat.group_size == 0
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith(in_blocks)
    )
    if not width_ok:
        raise ConfigError(
            f"config key 'qat.group_size' ({qat.group_size}) must divide the inputs of every linear layer in the blocks"
        )

    def eligible(module: nn.Module, fqn: str) -> bool:
        return type(module) is nn.Linear and fqn.startswith(in_blocks)

    config = qat_configs(qat)
    before = sum(type(m) is nn.Linear for m in model.modules())
    with quiet_torchao():  # torchao imports its prototype QAT modules on the first call
        from torchao.quantization import quantize_

        quantize_(model, config, filter_fn=eligible)
    return before - sum(type(m) is nn.Linear for m in model.modules())
