"""lmforge compress prune: magnitude (global, per layer), 2:4 and heads-channels on a debug llama, the
artifacts they write (a run directory that loads, generates, evaluates and fine-tunes), the recovery
fine-tune that keeps the zeros, and the one-line errors of a corrupted or mismatched artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import lmforge
from lmforge.cli import main
from lmforge.compress.prune import (
    block_linears,
    importance,
    is_2_4,
    prune_2_4,
    prune_checkpoint,
    prune_heads_channels,
    prune_magnitude,
    pruned_shape,
    recovery_config,
    zero_fraction,
)
from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.models import Llama, build_model, model_config
from lmforge.rundir import latest_checkpoint, sha256_file

LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, session_debug_config) -> Path:
    """A debug llama with QK-norm (a norm per head_dim, which head pruning must leave alone), 6 steps."""
    from lmforge.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("prune") / "base"
    quiet = {"progress": False, "tensorboard": False, "plot": False}
    cfg = session_debug_config(
        model={"qk_norm": True}, train={"max_steps": 6, "eval_every": 0, "sample_tokens": 0}, logging=quiet
    )
    pretrain(cfg, out)
    return out


def debug_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = build_model(model_config("llama", "debug", qk_norm=True))
    assert isinstance(model, Llama)
    return model


# ---------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_zeroes_the_smallest_weights_exactly(scope):
    model = debug_llama()
    before = {name: linear.weight.detach().clone() for name, linear in block_linears(model).items()}
    prune_magnitude(model, 0.3, scope)
    after = {name: linear.weight.detach() for name, linear in block_linears(model).items()}
    assert len(after) == 2 * len(LINEARS)
    total = sum(w.numel() for w in before.values())
    zeros = {name: int((w == 0).sum()) for name, w in after.items()}
    if scope == "layer":  # each tensor: round(0.3 n) zeros (torch's rule), within one element
        assert all(abs(zeros[name] - 0.3 * w.numel()) <= 1 for name, w in before.items())
    else:  # one threshold: the fraction is exact over all of them, not in each
        assert sum(zeros.values()) == round(0.3 * total)
        assert len({round(z / before[name].numel(), 2) for name, z in zeros.items()}) > 1
    for name, w in before.items():  # the zeros are the smallest |w| (of the layer, or of all)
        kept = after[name] != 0
        assert torch.equal(after[name][kept], w[kept])
    removed = torch.cat([w[after[name] == 0].abs() for name, w in before.items()])
    kept = torch.cat([w[after[name] != 0].abs() for name, w in before.items()])
    if scope == "global":
        assert removed.max() <= kept.min()
    # Permanent: plain parameters under their own names, no masks, no hooks.
    assert all(not name.endswith(("_orig", "_mask")) for name in model.state_dict())
    assert all(not linear._forward_pre_hooks for linear in block_linears(model).values())
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


def test_2_4_pruning_keeps_the_two_largest_of_every_four():
    model = debug_llama()
    before = {name: linear.weight.detach().clone() for name, linear in block_linears(model).items()}
    prune_2_4(model)
    for name, linear in block_linears(model).items():
        groups = linear.weight.detach().reshape(linear.out_features, -1, 4)  # 4 along the input dim
        assert torch.equal((groups == 0).sum(-1), torch.full(groups.shape[:2], 2))
        largest = before[name].abs().reshape(groups.shape).topk(2, dim=-1).indices.sort(-1).values
        assert torch.equal((groups != 0).nonzero()[:, 2].reshape(largest.shape), largest)
        assert is_2_4(linear.weight)
    assert zero_fraction(model) == 0.5
    assert not is_2_4(debug_llama().layers["0"].attention.wq.weight)


# ---------------------------------------------------------------------------- structured


def test_heads_channels_prune_the_least_important_and_compute_what_zeroing_them_computes():
    model = debug_llama()
    cfg = model.cfg  # 4 heads in 2 kv groups of 2, head_dim 16, ffn_hidden 256
    with torch.no_grad():  # layer 0's kv group 0 writes nothing: its heads must be the ones to go
        model.layers["0"].attention.wv.weight[: cfg.head_dim] = 0
    batches = [torch.randint(0, cfg.vocab_size, (2, 16)) for _ in range(2)]
    heads, channels = importance(model, batches)
    assert heads.shape == (2, 4) and channels.shape == (2, 256)
    assert heads[0, :2].abs().max() == 0 and heads[0, 2:].min() > 0
    pruned = prune_heads_channels(model, batches, 0.5)
    assert (pruned.cfg.n_heads, pruned.cfg.n_kv_heads, pruned.cfg.head_dim, pruned.cfg.ffn_hidden) == (
        2,
        1,
        16,
        128,
    )
    assert pruned_shape(cfg, 0.5) == (1, 128) and pruned_shape(cfg, 0.25) == (1, 64)  # round half up
    attention = pruned.layers["0"].attention
    assert attention.wq.weight.shape == (32, 64) and attention.wk.weight.shape == (16, 64)
    assert attention.wo.weight.shape == (64, 32) and pruned.layers["1"].feed_forward.w2.weight.shape == (
        64,
        128,
    )
    assert torch.equal(attention.wk.weight, model.layers["0"].attention.wk.weight[16:])  # group 1 kept
    assert torch.equal(attention.q_norm.weight, model.layers["0"].attention.q_norm.weight)
    # Parameters: each layer loses 1 kv group (2 query heads) and 128 channels.
    removed_per_layer = (2 * 16 * 64) * 2 + (16 * 64) * 2 + 3 * 128 * 64
    assert pruned.num_params() == model.num_params() - cfg.n_layers * removed_per_layer
    # The pruned model computes what the whole one computes with the removed heads' and channels'
    # outputs zeroed (wo's and w2's columns): the right rows, columns and RoPE layout were kept.
    with torch.no_grad():
        for index, block in model.layers.items():
            kept_heads = _kept(block.attention.wo.weight, pruned.layers[index].attention.wo.weight, 16)
            block.attention.wo.weight.unflatten(1, (-1, 16))[:, ~kept_heads] = 0
            kept_channels = _kept(
                block.feed_forward.w2.weight, pruned.layers[index].feed_forward.w2.weight, 1
            )
            block.feed_forward.w2.weight[:, ~kept_channels] = 0
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    torch.testing.assert_close(pruned(idx), model(idx), rtol=1e-5, atol=1e-5)


def _kept(whole: torch.Tensor, pruned: torch.Tensor, width: int) -> torch.Tensor:
    """Which column blocks of `width` of `whole` are in `pruned` (bool per block)."""
    blocks = whole.unflatten(1, (-1, width)).transpose(0, 1).flatten(1)  # (n_blocks, rows * width)
    kept = pruned.unflatten(1, (-1, width)).transpose(0, 1).flatten(1)
    return (blocks[:, None] == kept[None]).all(-1).any(-1)


def test_heads_channels_artifact_is_a_smaller_run_that_loads_generates_and_finetunes(
    base_run, prepared_dir, tmp_path, capsys
):
    out = tmp_path / "hc"
    assert main(["compress", "prune", str(base_run), "--method", "heads-channels", "--sparsity", "0.5",
                 "--calibration-batches", "2", "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = load_config(out / "config.yaml")
    assert cfg.model.shape == {"n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 128, "head_dim": 16}
    assert (cfg.compress.prune, cfg.compress.sparsity) == ("heads-channels", 0.5)
    assert cfg.compress.source == str(latest_checkpoint(base_run).resolve())
    model, _ = lmforge.load(out)
    whole, _ = lmforge.load(base_run)
    assert summary["params"] == model.num_params() < summary["params_before"] == whole.num_params()
    assert model.layers["1"].attention.wv.weight.shape == (16, 64)
    ckpt = latest_checkpoint(out)
    with safe_open(str(next((ckpt / "model").glob("*.safetensors"))), "pt") as f:
        assert set(f.keys()) == set(whole.state_dict())  # plain names
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert (
        main(["eval", str(out), "--batches", "2", "--batch-size", "2"]) == 0
    )  # the source's validation data
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"] > 0
    # finetune --init on it trains, and resumes (a recipe without a model section: the init's is used)
    recipe = yaml.safe_load(Path("recipes/debug.yaml").read_text())
    del recipe["model"]
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(recipe))
    finetune = ["finetune", "--config", str(tmp_path / "ft.yaml"), "--init", str(out), "--out", str(tmp_path / "ft"),
                f"--data.dir={prepared_dir}", "--data.vocab_size=512", "--train.eval_every=0",
                "--train.sample_tokens=0", "--logging.progress=false",
                "--logging.tensorboard=false", "--logging.plot=false"]  # fmt: skip
    assert main([*finetune, "--train.max_steps=2"]) == 0
    assert main([*finetune, "--train.max_steps=3", "--resume"]) == 0
    assert latest_checkpoint(tmp_path / "ft").name == "step_0000003"
    assert lmforge.load(tmp_path / "ft")[0].cfg == model.cfg


# ---------------------------------------------------------------------------- artifacts, recovery, errors


@pytest.mark.parametrize("method", ["magnitude", "2:4"])
def test_unstructured_artifact_holds_the_pruned_weights(base_run, tmp_path, method):
    result = prune_checkpoint(latest_checkpoint(base_run), method, tmp_path / "out", sparsity=0.5)
    model, _ = lmforge.load(tmp_path / "out")
    assert zero_fraction(model) == result["zero_fraction"] == 0.5
    assert result["params"] == result["params_before"] == model.num_params()
    assert load_config(tmp_path / "out" / "config.yaml").compress.prune == method
    if method == "2:4":
        assert all(is_2_4(linear.weight) for linear in block_linears(model).values())


def test_recovery_keeps_the_zeros_and_resumes(base_run, tmp_path, capsys):
    out = tmp_path / "recovered"
    command = ["compress", "prune", str(base_run), "--method", "magnitude", "--out", str(out)]
    assert main([*command, "--recover-steps", "3"]) == 0
    pruned, _ = lmforge.load(out / "base")
    recovered, _ = lmforge.load(out)
    assert latest_checkpoint(out).name == "step_0000003"
    cfg = load_config(out / "config.yaml")
    assert cfg.sparsity.keep_zeros and cfg.train.max_steps == 3 and cfg.compress.prune == "magnitude"
    assert cfg.train.init == str(latest_checkpoint(out / "base").resolve())
    for name, linear in block_linears(recovered).items():
        before = block_linears(pruned)[name].weight
        assert torch.equal(linear.weight == 0, before == 0)  # the pruned pattern, exactly
        assert not torch.equal(linear.weight, before)  # and the other weights trained
    assert main([*command, "--recover-steps", "4"]) == 0  # run again: it resumes
    assert latest_checkpoint(out).name == "step_0000004"
    assert zero_fraction(lmforge.load(out)[0]) == 0.5
    assert main([*command, "--recover-steps", "4", "--sparsity", "0.3"]) == 2
    assert "holds the recovery of another pruning" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("method", "distill"),
    [("2:4", []), ("magnitude", ["--recover-distill"])],
    ids=["2:4", "magnitude-distilled"],
)
def test_recovery_keeps_the_pruned_pattern(base_run, tmp_path, method, distill):
    """2:4 recovery keeps two zeros in every four weights; a recovery distilled from the unpruned model
    (the Distillation objective instead of plain cross-entropy) keeps the zeros as the plain one does."""
    out = tmp_path / "recovered"
    assert main(["compress", "prune", str(base_run), "--method", method, "--out", str(out),
                 "--recover-steps", "2", *distill]) == 0  # fmt: skip
    cfg = load_config(out / "config.yaml")
    assert cfg.sparsity.keep_zeros and latest_checkpoint(out).name == "step_0000002"
    assert cfg.distill.teacher == (str(latest_checkpoint(base_run).resolve()) if distill else None)
    pruned, _ = lmforge.load(out / "base")
    recovered, _ = lmforge.load(out)
    for name, linear in block_linears(recovered).items():
        before = block_linears(pruned)[name].weight
        assert torch.equal(linear.weight == 0, before == 0)  # the pruned pattern, exactly
        assert not torch.equal(linear.weight, before)  # and the other weights trained
    assert zero_fraction(recovered) == 0.5
    if method == "2:4":  # every group of 4 consecutive weights of a row still holds 2 zeros or more
        assert all(is_2_4(linear.weight) for linear in block_linears(recovered).values())


def test_recovery_config(base_run, tmp_path):
    source = latest_checkpoint(base_run)
    base = Path(prune_checkpoint(source, "heads-channels", tmp_path / "b", 0.5, calibration=1)["checkpoint"])
    cfg = recovery_config(source, base, 200, distill=True)
    pretrained = load_config(source / "config.yaml")
    assert (cfg.train.max_steps, cfg.schedule.warmup_steps, cfg.optim.lr) == (
        200,
        20,
        pretrained.optim.lr / 3,
    )
    assert not cfg.sparsity.keep_zeros  # heads-channels' matrices are dense
    assert cfg.distill.teacher == str(source.resolve())
    assert cfg.model == load_config(base / "config.yaml").model
    assert recovery_config(source, base, 10, distill=False).distill.teacher is None


def test_recovery_distills_from_the_unpruned_model(base_run, tmp_path):
    pytest.importorskip("lmforge.train.distill")
    out = tmp_path / "distilled"
    assert main(["compress", "prune", str(base_run), "--method", "heads-channels", "--calibration-batches", "1",
                 "--out", str(out), "--recover-steps", "2", "--recover-distill"]) == 0  # fmt: skip
    assert load_config(out / "config.yaml").distill.teacher == str(latest_checkpoint(base_run).resolve())
    assert latest_checkpoint(out).name == "step_0000002"


def test_corrupted_or_mismatched_artifact_is_one_error_line(base_run, tmp_path, capsys):
    out = tmp_path / "hc"
    prune_checkpoint(latest_checkpoint(base_run), "heads-channels", out, 0.5, calibration=1)
    ckpt = latest_checkpoint(out)
    # Mismatched: a config that says the unpruned shape, its manifest consistent with it.
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    config["model"]["shape"] = None
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["config.yaml"] = {"bytes": (ckpt / "config.yaml").stat().st_size,
                                        "sha256": sha256_file(ckpt / "config.yaml")}  # fmt: skip
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error:") and "has shape [32, 64], the model expects [64, 64]" in err
    assert len(err.splitlines()) == 1
    # Corrupted: one byte of the weights flipped.
    weights = next((ckpt / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["generate", str(ckpt), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err and weights.name in err


def test_refusals(base_run, tmp_path, capsys):
    source = latest_checkpoint(base_run)
    assert main(["compress", "prune", str(base_run), "--out", str(tmp_path / "x")]) == 2  # no --method
    assert main(["compress", "prune", str(base_run), "--method", "magnitude", "--sparsity", "1.5",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert main(["compress", "prune", str(base_run), "--method", "magnitude", "--recover-distill",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("lmforge: error:") for line in errors)
    assert "--method" in errors[0] and "--sparsity" in errors[1] and "--recover-steps" in errors[2]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        prune_checkpoint(source, "magnitude", tmp_path / "full")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["model"].update(family="gpt2", qk_norm=False)
    (gpt2 / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="heads-channels prunes llama models"):
        prune_checkpoint(gpt2, "heads-channels", tmp_path / "y")
