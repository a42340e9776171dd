"""Pruning: a checkpoint in, a run directory with a pruned model out (`lmforge compress prune`).

Three methods, each applied to the linear layers inside the transformer blocks (the token embedding
and the output head stay whole: they are a lookup and the one matrix every token's loss reads):

- `magnitude`: the weights of smallest |w| set to zero, over all those layers at once (scope
  global: one threshold, so layers of smaller weights lose more) or the same fraction in each (scope
  layer). torch.nn.utils.prune computes the masks (L1Unstructured, global_unstructured), and
  prune.remove makes them permanent: the saved model is a plain one with zeros in it.
- `2:4`: in every group of 4 consecutive weights along a row (the input dimension), the 2 of
  smallest |w| set to zero: the pattern sparse tensor cores run at up to twice the speed (NVIDIA
  Ampere and later; torch.sparse.to_sparse_semi_structured). The masks are torchao's
  (torchao.sparsity.apply_fake_sparsity, which runs on a CPU); the speed-up needs a GPU.
- `heads-channels`: width pruning as in Minitron (Muralidharan et al. 2024, "Compact Language
  Models via Pruning and Knowledge Distillation"): each attention head and each MLP channel gets an
  importance from the activations of calibration batches of the run's own training data, and the
  least important are removed from every layer: the matrices shrink, and so does the config
  (model.shape: n_heads, n_kv_heads, ffn_hidden and head_dim, which stays what it was). Llama only.

The artifact is a run directory like any other (lmforge.rundir), so generate, eval, lmforge.load,
export and `finetune --init` read it unchanged:

    OUT/config.yaml        the source's config with compress.prune / sparsity / source set (and the
                           smaller model.shape of heads-channels; data.dir: the source's data)
    OUT/tokenizer.json
    OUT/checkpoints/step_0000000/   model/*.safetensors (torch.distributed.checkpoint's Hugging Face
                           writer, as the trainer writes them), config.yaml, tokenizer.json, and the
                           manifest with every file's sha256, written last

The recovery fine-tune (`--recover-steps`) is training, which this package does not import: the CLI
runs it with the config `recovery_config` makes (lmforge.cli.compress_prune).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.nn.utils import prune

from lmforge.adapt.lora import merge_lora
from lmforge.config import (
    CheckpointConfig,
    DistillConfig,
    LoraConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
    SparsityConfig,
    config_sha256,
    load_config,
    one_line,
    save_config,
)
from lmforge.data.loader import BatchLoader
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import FamilyModel, Llama, LlamaConfig, blocks, build_model, spec_of
from lmforge.models.llama.model import Attention, FeedForward
from lmforge.rundir import (
    FORMAT_VERSION,
    MANIFEST,
    checkpoint_name,
    data_dir_for,
    list_checkpoints,
    load_model_weights,
    meta_model,
    model_state_dict,
    sha256_file,
)
from lmforge.runtime import quiet_torchao

METHODS: tuple[str, ...] = ("magnitude", "heads-channels", "2:4")


# ---------------------------------------------------------------------------- what is pruned


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the transformer blocks, by module name ("layers.0.attention.wq")."""
    prefix = f"{spec_of(model).blocks}."
    return {
        f"{prefix}{index}.{name}": module
        for index, block in blocks(model).items()
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }


def zero_fraction(model: nn.Module) -> float:
    """The fraction of the weights of the blocks' linear layers that are exactly zero."""
    weights = [linear.weight for linear in block_linears(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# ---------------------------------------------------------------------------- unstructured


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float, scope: Literal["global", "layer"]) -> None:
    """Zero the fraction `sparsity` of the blocks' linear weights of smallest magnitude, in place:
    over all of them at once (global) or in each layer (layer). round(sparsity * n) weights of the
    n considered become zero (torch's rule), and the masks are folded into the weights."""
    linears = list(block_linears(model).values())
    if scope == "global":
        prune.global_unstructured(
            [(linear, "weight") for linear in linears], pruning_method=prune.L1Unstructured, amount=sparsity
        )
    else:
        for linear in linears:
            prune.l1_unstructured(linear, "weight", amount=sparsity)
    for linear in linears:
        prune.remove(linear, "weight")  # weight = weight_orig * weight_mask, a plain parameter again


@torch.no_grad()
def prune_2_4(model: nn.Module) -> None:
    """In every group of 4 consecutive weights of each row of the blocks' linear layers, zero the 2
    of smallest magnitude, in place (torchao's masks; their in_features must be multiples of 4)."""
    linears = block_linears(model)
    for name, linear in linears.items():
        if linear.in_features % 4:
            raise ConfigError(
                f"--method 2:4 needs in_features divisible by 4; {name} has {linear.in_features}"
            )
    apply_fake_sparsity = _torchao_fake_sparsity()
    apply_fake_sparsity(model, filter_fn=lambda module, name: name in linears)


def _torchao_fake_sparsity():
    """torchao.sparsity.apply_fake_sparsity, imported without the warnings its import logs on a CPU
    machine (its CUDA kernels not loaded; a deprecation inside torch.utils._pytree)."""
    try:
        with quiet_torchao():
            from torchao.sparsity import apply_fake_sparsity
    except ImportError:
        raise ConfigError("--method 2:4 needs torchao: pip install torchao") from None
    return apply_fake_sparsity


def is_2_4(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive weights of each row holds at least 2 zeros."""
    return bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


# ---------------------------------------------------------------------------- structured (Minitron)


@torch.no_grad()
def importance(model: Llama, batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Activation importance of every attention head and MLP channel of every layer over `batches`
    (each (B, T) token ids): (n_layers, n_heads) and (n_layers, ffn_hidden), fp32.

    A head's: the mean over the calibration tokens of the L2 norm of its attention output (its
    head_dim slice of wo's input). A channel's: the mean |silu(w1 x) * w3 x| (w2's input). Read by
    forward pre-hooks on wo and w2, so the model's own forward computes them."""
    cfg = model.cfg
    assert cfg.head_dim is not None and cfg.ffn_hidden is not None
    layers = list(blocks(model).values())
    heads = torch.zeros(len(layers), cfg.n_heads)
    channels = torch.zeros(len(layers), cfg.ffn_hidden)
    tokens = 0

    def add_heads(layer: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            y = args[0].float()  # (B, T, n_heads * head_dim)
            heads[layer] += y.unflatten(-1, (cfg.n_heads, -1)).norm(dim=-1).sum(dim=(0, 1))  # (n_heads,)

        return hook

    def add_channels(layer: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            channels[layer] += args[0].float().abs().sum(dim=(0, 1))  # (ffn_hidden,)

        return hook

    handles = []
    for i, block in enumerate(layers):
        attention, feed_forward = _attention(block), _feed_forward(block)
        handles.append(attention.wo.register_forward_pre_hook(add_heads(i)))
        handles.append(feed_forward.w2.register_forward_pre_hook(add_channels(i)))
    was_training = model.training
    model.eval()
    try:
        for inputs in batches:
            model(inputs)
            tokens += inputs.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return heads / tokens, channels / tokens


def _attention(block: nn.Module) -> Attention:
    attention = getattr(block, "attention", None)
    assert isinstance(attention, Attention)
    return attention


def _feed_forward(block: nn.Module) -> FeedForward:
    feed_forward = getattr(block, "feed_forward", None)
    assert isinstance(feed_forward, FeedForward)
    return feed_forward


def pruned_shape(cfg: LlamaConfig, sparsity: float) -> tuple[int, int]:
    """(kv groups, MLP channels) each layer removes for `sparsity`: round(sparsity * n), half up,
    at least one of each kept.

    With grouped-query attention whole kv groups go (a key/value head and the n_heads / n_kv_heads
    query heads that read it), so every layer keeps the GQA structure with one config; pruning query
    heads evenly within the groups would need sparsity to be a multiple of n_kv_heads / n_heads
    (the tiny model has groups of 2: only 0 or 50%), whole groups any multiple of 1 / n_kv_heads."""
    assert cfg.n_kv_heads is not None and cfg.ffn_hidden is not None
    groups = min(math.floor(sparsity * cfg.n_kv_heads + 0.5), cfg.n_kv_heads - 1)
    channels = min(math.floor(sparsity * cfg.ffn_hidden + 0.5), cfg.ffn_hidden - 1)
    return groups, channels


@torch.no_grad()
def prune_heads_channels(model: Llama, batches: list[Tensor], sparsity: float) -> Llama:
    """A new, smaller Llama without the least important kv groups (with their query heads) and MLP
    channels of every layer (the same number in each: `pruned_shape`), by `importance` on `batches`.

    The rows of wq (query heads), wk and wv (kv heads) of the removed heads go, and the matching
    columns of wo; the rows of w1 and w3 and the columns of w2 of the removed channels. Rows are
    head-major (head h: rows h * head_dim .. (h + 1) * head_dim, in RoPE's interleaved pair order
    within the head), so whole heads are cut out without touching RoPE; QK-norm weights are per
    head_dim and stay as they are."""
    cfg = model.cfg
    assert cfg.n_kv_heads is not None and cfg.ffn_hidden is not None and cfg.head_dim is not None
    remove_groups, remove_channels = pruned_shape(cfg, sparsity)
    head_scores, channel_scores = importance(model, batches)
    n_rep = cfg.n_heads // cfg.n_kv_heads
    new_cfg = replace(
        cfg,
        n_heads=(cfg.n_kv_heads - remove_groups) * n_rep,
        n_kv_heads=cfg.n_kv_heads - remove_groups,
        ffn_hidden=cfg.ffn_hidden - remove_channels,
        head_dim=cfg.head_dim,
    )
    state = dict(model.state_dict())
    prefix = spec_of(model).blocks
    for (index, _), heads, channels in zip(blocks(model).items(), head_scores, channel_scores, strict=True):
        group_scores = heads.view(cfg.n_kv_heads, n_rep).sum(dim=1)  # (n_kv_heads,)
        keep_groups = group_scores.topk(new_cfg.n_kv_heads).indices.sort().values
        keep_heads = (keep_groups[:, None] * n_rep + torch.arange(n_rep)).flatten()  # query heads of those
        keep_channels = channels.topk(new_cfg.ffn_hidden).indices.sort().values
        at = f"{prefix}.{index}."
        # Whole heads: rows of wq (query heads), wk and wv (kv heads), columns of wo (query heads).
        for name, keep, dim in [
            ("wq", keep_heads, 0),
            ("wk", keep_groups, 0),
            ("wv", keep_groups, 0),
            ("wo", keep_heads, 1),
        ]:
            key = f"{at}attention.{name}.weight"
            state[key] = _take_heads(state[key], keep, cfg.head_dim, dim)
        for name, dim in [("w1", 0), ("w3", 0), ("w2", 1)]:  # channels: rows of w1 and w3, columns of w2
            key = f"{at}feed_forward.{name}.weight"
            state[key] = state[key].index_select(dim, keep_channels)
    pruned = build_model(new_cfg, "meta")
    assert isinstance(pruned, Llama)
    pruned.to_empty(device=next(model.parameters()).device)
    pruned.init_weights()  # the RoPE tables (not saved)
    pruned.load_state_dict(state)
    pruned.tie_weights()
    return pruned


def _take_heads(weight: Tensor, keep: Tensor, head_dim: int, dim: int) -> Tensor:
    """The heads `keep` (indices) of a weight whose dimension `dim` is head-major, n_heads * head_dim
    (wq, wk, wv: rows; wo: columns): a copy, len(keep) * head_dim wide there."""
    return weight.unflatten(dim, (-1, head_dim)).index_select(dim, keep).flatten(dim, dim + 1)


def calibration_batches(cfg: RunConfig, run_dir: Path, n_batches: int) -> list[Tensor]:
    """The first `n_batches` training batches of the run (its seed's order): (micro_batch_size,
    seq_len) token ids each, read from its prepared data directory, which must exist."""
    data_dir = data_dir_for(cfg.data, run_dir)
    if cfg.data.task != "lm":
        raise ConfigError(
            f"--method heads-channels calibrates on language-model data; the run's data.task is {cfg.data.task}"
        )
    if not (data_dir / "manifest.json").is_file():
        raise ConfigError(
            f"--method heads-channels needs the run's prepared training data: {data_dir} has no manifest.json"
        )
    loader = BatchLoader(data_dir, "train", cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.seed)
    try:
        return [loader.next_batch()[0] for _ in range(n_batches)]
    finally:
        loader.close()


# ---------------------------------------------------------------------------- the artifact


def prune_checkpoint(
    ckpt_dir: Path,
    method: str,
    out_dir: Path,
    sparsity: float = 0.5,
    scope: Literal["global", "layer"] = "global",
    calibration: int = 8,
) -> dict:
    """Prune the (verified) checkpoint `ckpt_dir` with `method` and write the run directory
    `out_dir` (module docstring). 2:4 always removes half. Returns what was done:
    {"checkpoint", "method", "sparsity", "params_before", "params", "zero_fraction"} (params: the
    model's parameters; zero_fraction: of the blocks' linear weights)."""
    if method not in METHODS:
        raise ConfigError(f"--method is {method!r}; choose one of {', '.join(METHODS)}")
    if scope not in ("global", "layer"):
        raise ConfigError(f"--scope is {scope!r}; choose global or layer")
    sparsity = 0.5 if method == "2:4" else sparsity
    if not 0.0 < sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in (0, 1), got {sparsity}")
    if calibration < 1:
        raise ConfigError(f"--calibration-batches must be >= 1, got {calibration}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} exists and is not empty: choose a new directory")
    cfg = load_config(ckpt_dir / "config.yaml")
    if cfg.compress.quantize:
        raise ConfigError(
            f"{ckpt_dir} is quantized ({cfg.compress.quantize}): prune the model it was quantized from"
        )
    if method == "heads-channels" and cfg.model.family != "llama":
        raise ConfigError(
            f"--method heads-channels prunes llama models; {ckpt_dir} is {cfg.model.family} "
            "(magnitude and 2:4 prune any family)"
        )
    model = _load(ckpt_dir)
    params_before = model.num_params()
    run_dir = ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else ckpt_dir
    if method == "magnitude":
        prune_magnitude(model, sparsity, scope)
    elif method == "2:4":
        prune_2_4(model)
    else:
        assert isinstance(model, Llama)  # the family, checked above
        if model.cfg.n_classes:
            raise ConfigError(f"{ckpt_dir} is a classifier: --method heads-channels prunes language models")
        model = prune_heads_channels(model, calibration_batches(cfg, run_dir, calibration), sparsity)
    pruned_cfg = _pruned_config(cfg, model, method, sparsity, ckpt_dir, run_dir)
    checkpoint = write_run(out_dir, model, pruned_cfg, ckpt_dir / "tokenizer.json")
    return {"checkpoint": str(checkpoint), "method": method, "sparsity": sparsity, "params_before": params_before,
            "params": model.num_params(), "zero_fraction": round(zero_fraction(model), 6)}  # fmt: skip


def _load(ckpt_dir: Path) -> FamilyModel:
    """The checkpoint's model on the CPU in fp32, LoRA adapters merged (lmforge.api's load, which
    this layer cannot import)."""
    model = meta_model(ckpt_dir)
    model.to_empty(device="cpu")
    model.init_weights()
    load_model_weights(model, ckpt_dir / "model")
    merge_lora(model)
    return model.eval()


def _pruned_config(
    cfg: RunConfig, model: FamilyModel, method: str, sparsity: float, ckpt_dir: Path, run_dir: Path
) -> RunConfig:
    """The source's config as the artifact's: compress section set, adapters merged, the data
    directory the source's (so that `lmforge eval OUT` reads its validation split), and the smaller
    shape of a structurally pruned model."""
    model_section = cfg.model
    if method == "heads-channels":
        pruned = model.cfg
        assert isinstance(pruned, LlamaConfig)
        assert pruned.n_kv_heads is not None and pruned.ffn_hidden is not None and pruned.head_dim is not None
        shape = {**(cfg.model.shape or {}), "n_heads": pruned.n_heads, "n_kv_heads": pruned.n_kv_heads,
                 "ffn_hidden": pruned.ffn_hidden, "head_dim": pruned.head_dim}  # fmt: skip
        model_section = replace(cfg.model, shape=shape)
    data_dir = data_dir_for(cfg.data, run_dir)
    data = (
        replace(cfg.data, dir=str(data_dir.resolve())) if (data_dir / "manifest.json").is_file() else cfg.data
    )
    compress = replace(cfg.compress, prune=method, sparsity=sparsity, source=str(ckpt_dir.resolve()))
    return replace(cfg, model=model_section, data=data, lora=LoraConfig(), compress=compress)


def write_run(out_dir: Path, model: nn.Module, cfg: RunConfig, tokenizer_path: Path) -> Path:
    """OUT/config.yaml, OUT/tokenizer.json and the checkpoint OUT/checkpoints/step_0000000 of `model`
    in the run-directory format, written into a temporary directory and renamed into place once its
    manifest is complete (a run directory without a valid checkpoint is no model). Returns it."""
    final = out_dir / "checkpoints" / checkpoint_name(0)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with warnings.catch_warnings():  # DCP warns that it runs without a process group: we want that
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            state = {name: t.detach().contiguous() for name, t in model_state_dict(model).items()}
            dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "model")), no_dist=True)
        save_config(cfg, tmp / "config.yaml")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        files = {
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {"format": FORMAT_VERSION, "step": 0, "config_sha256": config_sha256(cfg), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for path in (p for p in tmp.rglob("*") if p.is_file()):  # on disk before the rename makes it valid
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        for name in ("config.yaml", "tokenizer.json"):  # the run's own copies, each renamed into place
            shutil.copyfile(tmp / name, out_dir / f".{name}.tmp")
            os.replace(out_dir / f".{name}.tmp", out_dir / name)
        os.replace(tmp, final)
    except (OSError, dcp.CheckpointException) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {final}: {one_line(str(err))[:300]}") from None
    return final


# ---------------------------------------------------------------------------- recovery fine-tune


def recovery_config(source_ckpt: Path, base_ckpt: Path, steps: int, distill: bool) -> RunConfig:
    """The config of the recovery fine-tune of the pruned checkpoint `base_ckpt` (made from
    `source_ckpt`): the source run's own, with train.init the pruned model and a short schedule.

    `steps` optimizer steps on the source's data and batch size, warmup the first tenth, then a
    cosine decay from a peak learning rate of a third of the source's to a tenth of that. Lower than
    pretraining's peak because the weights are already trained and only need to close the gap the
    pruning opened (pretraining's peak step would first move them away from where they were); not
    as low as the usual fine-tuning rates, because the run is short and the gap is large at first.
    The optimizer, batch and precision stay the source's. Unstructured and 2:4 models keep their
    zeros (sparsity.keep_zeros); with `distill`, the unpruned model is the teacher (distill section).
    One checkpoint, at the end."""
    if steps < 1:
        raise ConfigError(f"--recover-steps must be >= 1, got {steps}")
    cfg = load_config(base_ckpt / "config.yaml")
    if cfg.data.task != "lm":
        raise ConfigError(
            f"--recover-steps trains on language-model data; the run's data.task is {cfg.data.task}"
        )
    keep_zeros = cfg.compress.prune in ("magnitude", "2:4")  # heads-channels' smaller matrices are dense
    return replace(
        cfg,
        data=replace(cfg.data, tokenizer=None),  # finetune adopts the init's (the same file's copy)
        optim=replace(cfg.optim, lr=cfg.optim.lr / 3),
        schedule=ScheduleConfig(name="cosine", warmup_steps=max(1, steps // 10), min_lr_ratio=0.1),
        train=replace(
            cfg.train, max_steps=steps, init=str(base_ckpt.resolve()), eval_every=steps, target_val_loss=None
        ),  # fmt: skip
        checkpoint=CheckpointConfig(every_steps=0, keep_last=1),
        parallel=ParallelConfig(),  # this process
        sparsity=SparsityConfig(keep_zeros=keep_zeros),
        distill=DistillConfig(teacher=str(source_ckpt.resolve())) if distill else DistillConfig(),
    )


def prune_for_recovery(
    ckpt_dir: Path,
    method: str,
    out_dir: Path,
    sparsity: float = 0.5,
    scope: Literal["global", "layer"] = "global",
    calibration: int = 8,
) -> Path:
    """The pruned checkpoint that the recovery fine-tune into `out_dir` starts from: OUT/base, written
    by prune_checkpoint, or the one an earlier, interrupted run of the same command wrote (so that a
    rerun resumes the fine-tune). Anything else already in OUT is refused."""
    base = out_dir / "base"
    if list_checkpoints(base):
        previous = load_config(list_checkpoints(base)[-1] / "config.yaml").compress
        asked = (method, 0.5 if method == "2:4" else sparsity, str(ckpt_dir.resolve()))
        if (previous.prune, previous.sparsity, previous.source) != asked:
            raise ConfigError(
                f"--out {out_dir} holds the recovery of another pruning ({previous.prune}, sparsity "
                f"{previous.sparsity}, of {previous.source}): choose a new directory"
            )
        return list_checkpoints(base)[-1]
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} exists and is not empty: choose a new directory")
    return Path(prune_checkpoint(ckpt_dir, method, base, sparsity, scope, calibration)["checkpoint"])
