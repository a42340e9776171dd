"""sparsity.keep_zeros: the zeros of a pruned model stay exactly zero through training (AdamW, whose
zero gradients give zero updates, and Muon, whose orthogonalised update does not: the weights are
zeroed again after each step), the other weights train, and without it the zeros are not kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.adapt.sparsity import apply_sparsity
from lmforge.config import FreezeConfig, OptimConfig, ParallelConfig, SparsityConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.models import blocks, build_model, model_config
from lmforge.parallel.apply import ModelLayout
from lmforge.train.step import build_train_step
from lmforge.train.transforms import apply_transforms

CPU = torch.device("cpu")


def block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{index}.{name}": module.weight
        for index, block in blocks(model).items()
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }


@pytest.mark.parametrize("keep_zeros", [True, False])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_zeros_stay_zero_through_training(optimizer, keep_zeros):
    torch.manual_seed(0)
    cfg = model_config("llama", "debug")
    step = build_train_step(cfg, TrainConfig(compile=False), ParallelConfig(),
                            OptimConfig(name=optimizer, lr=1e-2, weight_decay=0.1), ModelLayout(), CPU,
                            torch.float32, sparsity=SparsityConfig(keep_zeros=keep_zeros))  # fmt: skip
    assert step.model is not None
    with torch.no_grad():  # the pruned init, loaded after the transforms as fine-tuning loads it
        for weight in block_weights(step.model).values():
            weight.mul_(torch.rand_like(weight) < 0.5)
    before = {name: w.detach().clone() for name, w in block_weights(step.model).items()}
    for index in range(3):
        batch = (torch.randint(0, cfg.vocab_size, (2, 16)), torch.randint(0, cfg.vocab_size, (2, 16)))
        step.forward_backward([batch], lambda model, b: model(b[0], targets=b[1]), index)
        grads = {name: w.grad for name, w in block_weights(step.model).items()}
        masked = [bool((grads[name][w == 0] == 0).all()) for name, w in before.items()]
        assert all(masked) if keep_zeros else not any(masked)  # the gradient is masked before the step
        step.update(False)
    after = block_weights(step.model)
    kept = [torch.equal(after[name] == 0, w == 0) for name, w in before.items()]
    assert all(kept) if keep_zeros else not any(kept)
    assert all(
        (after[name] != w)[w != 0].float().mean() > 0.9 for name, w in before.items()
    )  # the rest trains


def test_only_what_trains_gets_a_mask_and_sharded_layouts_are_refused():
    model = build_model(model_config("llama", "debug"), "meta")
    apply_transforms(model, TrainConfig(compile=False), ParallelConfig(), ModelLayout(), CPU, torch.float32,
                     compile=False, freeze=FreezeConfig(first_blocks=1))  # fmt: skip
    assert apply_sparsity(model, SparsityConfig(keep_zeros=True)) == 7  # the 7 linears of block 1
    assert apply_sparsity(model, SparsityConfig(keep_zeros=False)) == 0
    with pytest.raises(ConfigError, match="sparsity.keep_zeros"):
        apply_transforms(build_model(model_config("llama", "debug"), "meta"), TrainConfig(compile=False),
                         ParallelConfig(), ModelLayout(data_parallel="fsdp"), CPU, torch.float32, compile=False,
                         sparsity=SparsityConfig(keep_zeros=True))  # fmt: skip
