"""LoRA as a model transform (lmforge.adapt.lora): what it selects, that it starts as the base
model, that merged and unmerged compute the same, and that PEFT loads its export onto the Hugging
Face export of the base and computes the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge.adapt.lora import LoRALinear, apply_lora, merge_lora, merge_state, target_modules
from lmforge.config import LoraConfig
from lmforge.errors import ConfigError
from lmforge.models import build_model, model_config
from lmforge.rundir import model_state_dict


def debug_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(model_config(family, "debug"), "cpu").eval()


def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero (the update is 0): give every adapter a large random value instead."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.parametrize(
    ("family", "targets", "selected"),
    [
        ("llama", ["attention"], ["attention.wk", "attention.wo", "attention.wq", "attention.wv"]),
        ("llama", ["wq", "w2"], ["attention.wq", "feed_forward.w2"]),
        ("llama", ["mlp"], ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]),
        ("gpt2", ["c_proj"], ["attn.c_proj", "mlp.c_proj"]),  # a name part at the end, in both
        ("gpt2", ["attn.c_proj", "c_fc"], ["attn.c_proj", "mlp.c_fc"]),
        ("gpt2", ["attn"], ["attn.c_attn", "attn.c_proj"]),  # name parts at the start
    ],
)
def test_targets_select_whole_name_parts(family, targets, selected):
    assert target_modules(debug_model(family), targets) == selected


@pytest.mark.parametrize(("family", "target"), [("llama", "q"), ("llama", "c_attn"), ("gpt2", "proj")])
def test_a_target_that_names_no_layer_is_refused_by_name(family, target):
    with pytest.raises(
        ConfigError, match=rf"lora.targets': '{target}' names no linear layer of a {family} block"
    ):
        apply_lora(debug_model(family), LoraConfig(rank=4, targets=[target]))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_adapters_train_and_base_names_stay(family):
    base = debug_model(family)
    model = copy.deepcopy(base)
    apply_lora(model, LoraConfig(rank=4, targets=["attention", "mlp"]))
    names = dict(model.named_parameters())
    trainable = sorted(n for n, p in names.items() if p.requires_grad)
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 2 * (7 if family == "llama" else 4)  # 2 blocks, A and B per layer
    # Every base weight keeps its name (so a LoRA run loads any base checkpoint), nothing else is new.
    assert set(model_state_dict(base)) == {n for n in model_state_dict(model) if "lora_" not in n}
    assert (
        names["layers.0.attention.wq.lora_A" if family == "llama" else "h.0.attn.c_attn.lora_A"].shape[0] == 4
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapters_start_at_the_base_model_and_merged_equals_unmerged(family):
    base = debug_model(family)
    model = copy.deepcopy(base)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=["attention", "mlp"]))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # B = 0: exactly the base
        randomise_adapters(model)
        unmerged = model(ids)
        assert (unmerged - base(ids)).abs().max() > 0.1  # the adapters change the output
        state = merge_state(model_state_dict(model), LoraConfig(rank=4, alpha=8.0))
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert (merged(ids) - unmerged).abs().max() < 1e-5
        # The same merge on a state dict (what the exports write) gives the same model.
        plain = debug_model(family, seed=5)
        plain.load_state_dict(state, strict=False)
        plain.tie_weights()
        assert (plain(ids) - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("switch", ["fused_projections", "float8"])
def test_lora_refuses_the_switches_that_replace_its_linears(switch, debug_config):
    with pytest.raises(ConfigError, match=rf"'lora.rank' must be 0 with train.{switch}"):
        debug_config(lora={"rank": 4}, train={switch: True})


def test_lora_refuses_a_linear_another_transform_swapped():
    model = debug_model("llama")
    block = model.layers["0"]
    block.attention.wq = nn.Bilinear(2, 2, 2)  # not an nn.Linear where the family has one
    block.attention.wk = type("Swapped", (nn.Linear,), {})(64, 32, bias=False)  # a subclass: refused too
    with pytest.raises(ConfigError, match="attention.wk is a Swapped, not an nn.Linear"):
        apply_lora(model, LoraConfig(rank=2, targets=["wk"]))


# ---------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_loads_the_adapters_onto_the_hf_export_of_the_base(family, tmp_path, prepared_dir, debug_config):
    """`export --format peft` of a LoRA checkpoint + `export --format hf` of its base: PEFT's model
    computes the LoRA model's logits (q/k rows permuted for llama, c_attn's for gpt2)."""
    import dataclasses

    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmforge.hf import export_hf, export_peft
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.optim import build_optimizer

    cfg = debug_config(model={"family": family, "flavor": "debug"})
    base = debug_model(family)
    with torch.no_grad():
        for param in base.parameters():
            param.normal_(0.0, 0.3)  # far from flat logits: a wrong permutation shows
    lora = LoraConfig(rank=4, alpha=8.0, targets=["attention", "mlp"])
    model = copy.deepcopy(base)
    apply_lora(model, lora)
    randomise_adapters(model)

    def save(module, run_cfg, name):
        optimizer = build_optimizer(module, run_cfg.optim, "cpu")
        return save_checkpoint(tmp_path / name, 1, module, optimizer, {"loader": {}}, run_cfg,
                               prepared_dir / "tokenizer.json", 1)  # fmt: skip

    base_ckpt = save(base, cfg, "base")
    lora_ckpt = save(model, dataclasses.replace(cfg, lora=lora, train=dataclasses.replace(cfg.train, init=str(base_ckpt))), "lora")  # fmt: skip
    export_hf(base_ckpt, tmp_path / "base-hf")
    path = export_peft(lora_ckpt, tmp_path / "peft")
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf"), tmp_path / "peft"
    ).eval()
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)
        assert (ours - base(ids)).abs().max() > 0.1
        assert (theirs(ids).logits - ours).abs().max() < 1e-4
    # The adapters alone are a small file beside the base.
    assert path.stat().st_size < 0.35 * (tmp_path / "base-hf" / "model.safetensors").stat().st_size


def test_peft_export_of_a_run_without_adapters_is_refused(tmp_path, prepared_dir, debug_config):
    from lmforge.errors import CheckpointError
    from lmforge.hf import export_peft
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.optim import build_optimizer

    cfg = debug_config()
    model = debug_model("llama")
    ckpt = save_checkpoint(tmp_path, 1, model, build_optimizer(model, cfg.optim, "cpu"), {"loader": {}}, cfg,
                           prepared_dir / "tokenizer.json", 1)  # fmt: skip
    with pytest.raises(CheckpointError, match="not a LoRA run"):
        export_peft(ckpt, tmp_path / "peft")
