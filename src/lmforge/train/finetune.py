"""Fine-tuning's set-up: the run starts from the weights of `train.init` (a run or checkpoint).

`adopt_init` resolves the init and gives the run its model section, tokenizer and context length.
For supervised fine-tuning (`data.task: sft`) a model whose tokenizer lacks the chat tokens first
gets them (lmforge.data.sft): `grow_vocabulary` writes RUN/base, a checkpoint of the init with the
tokens added to its tokenizer and their embedding rows (and an untied head's rows) set to the mean
of the existing tokens' rows (the usual initialisation for new tokens: they start as an average
token rather than as noise). That checkpoint is then the init, so every layout loads it as it
loads any checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lmforge.config import DataConfig, RunConfig, load_config, to_dict
from lmforge.data.sft import add_chat_tokens, has_chat_template
from lmforge.data.tokenizer import load_tokenizer, padded_vocab_size, save_tokenizer
from lmforge.errors import ConfigError
from lmforge.models import build_model, spec_of
from lmforge.rundir import (
    checkpoint_weights,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    run_model_config,
)
from lmforge.train.checkpoint import save_checkpoint, writing_alone
from lmforge.train.distributed import on_rank0
from lmforge.train.optim import build_optimizer
from lmforge.train.resume import without_classes


def adopt_init(cfg: RunConfig, run_dir: Path) -> tuple[RunConfig, Path]:
    """`cfg` with the model section, tokenizer and (unless the config sets another) context length
    of `train.init`, and the checkpoint to load. A model section or tokenizer of the config's own
    that differs from the init's is refused, except for the classification head's settings
    (model.shape.pooling), which the fine-tune sets."""
    assert cfg.train.init is not None
    init_dir = resolve_checkpoint(cfg.train.init).resolve()  # absolute: resumable from anywhere
    init_cfg = load_config(init_dir / "config.yaml")
    if init_cfg.lora.rank:
        raise ConfigError(
            f"config key 'train.init': {init_dir} is a LoRA run (its adapters are apart from its weights): "
            "fine-tune its base, or export it merged with `lmforge export` and import that"
        )
    if init_cfg.compress.quantize:
        raise ConfigError(
            f"config key 'train.init': {init_dir} is quantized ({init_cfg.compress.quantize}), its weights cannot "
            f"train: fine-tune the checkpoint it was made from ({init_cfg.compress.source}), then quantize the result"
        )
    mine, theirs = (without_head(to_dict(c)["model"]) for c in (cfg, init_cfg))  # a classifier head aside
    if mine not in (without_head(to_dict(RunConfig())["model"]), theirs):
        raise ConfigError(
            f"config section 'model' ({to_dict(cfg)['model']}) differs from that of config key 'train.init' "
            f"{init_dir} ({to_dict(init_cfg)['model']}): fine-tuning keeps the model; leave the section out "
            "(a classifier's head may set model.shape.pooling)"
        )
    seq_len = init_cfg.data.seq_len if cfg.data.seq_len == DataConfig().seq_len else cfg.data.seq_len
    weights_dir, model = init_dir, init_cfg.model
    if cfg.model.shape and "pooling" in cfg.model.shape:  # the fine-tune's choice of what the head reads
        model = replace(model, shape={**(model.shape or {}), "pooling": cfg.model.shape["pooling"]})
    if (
        cfg.data.task != "classify" and model.shape and "n_classes" in model.shape
    ):  # a classifier's head stays behind
        model = replace(model, shape={k: v for k, v in model.shape.items() if k != "n_classes"} or None)
    if cfg.data.task == "sft" and not has_chat_template(load_tokenizer(init_dir / "tokenizer.json")):
        weights_dir = on_rank0(grow_vocabulary, init_dir, run_dir / "base")
        model = load_config(weights_dir / "config.yaml").model
    tokenizer = str(weights_dir / "tokenizer.json")
    if cfg.data.tokenizer not in (None, tokenizer):
        raise ConfigError(
            f"config key 'data.tokenizer' ({cfg.data.tokenizer}) differs from the tokenizer of config key "
            f"'train.init' ({tokenizer}): fine-tuning keeps the model's tokenizer"
        )
    cfg = replace(cfg, model=model, data=replace(cfg.data, tokenizer=tokenizer, seq_len=seq_len),
                  train=replace(cfg.train, init=str(init_dir)))  # fmt: skip
    return cfg, weights_dir


def without_head(model: dict) -> dict:
    """A model section as a dict without the classification head's fields, which a fine-tune sets
    rather than takes from its init: the number of classes and the pooling (model.shape)."""
    shape = {k: v for k, v in (without_classes(model).get("shape") or {}).items() if k != "pooling"}
    return {**model, "shape": shape or None}


def grow_vocabulary(init_dir: Path, base_dir: Path) -> Path:
    """A checkpoint of `init_dir` whose tokenizer has the chat tokens, in base_dir (made once, then
    reused); new rows of the embedding (and untied head) are the mean of the tokenizer's old rows.
    One process does it (rank 0, under on_rank0): it writes the checkpoint alone, without collectives."""
    if list_checkpoints(base_dir):
        return latest_checkpoint(base_dir)
    cfg = load_config(init_dir / "config.yaml")
    tokenizer = load_tokenizer(init_dir / "tokenizer.json")
    old_tokens = tokenizer.get_vocab_size()
    add_chat_tokens(tokenizer)
    new_tokens = tokenizer.get_vocab_size()
    if cfg.model.vocab_size is not None and new_tokens > cfg.model.vocab_size:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=padded_vocab_size(new_tokens)))
    new_cfg = run_model_config(cfg.model, cfg.data.seq_len, new_tokens)
    weights = checkpoint_weights(init_dir)
    model = build_model(new_cfg, "cpu")
    stages = spec_of(model).stages
    for name in (f"{stages.embedding}.weight", f"{stages.head}.weight"):
        if name not in weights:  # a tied head: saved once, under the embedding's name
            continue
        old = weights[name]  # (old vocab rows, dim)
        grown = torch.empty(new_cfg.vocab_size, old.shape[1], dtype=old.dtype)
        rows = min(old.shape[0], new_cfg.vocab_size)
        grown[:rows] = old[:rows]
        grown[old_tokens:] = old[:old_tokens].mean(dim=0)  # the new tokens (and any spare rows after them)
        weights[name] = grown
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {f"{stages.head}.weight"}, (missing, unexpected)  # tied head
    model.tie_weights()
    base_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, base_dir / "tokenizer.json")
    cfg = replace(cfg, data=replace(cfg.data, tokenizer=str((base_dir / "tokenizer.json").resolve())))
    trainer_state = {"loader": {}, "grown_from": str(init_dir), "new_tokens": new_tokens - old_tokens}
    with writing_alone():
        return save_checkpoint(base_dir, 0, model, build_optimizer(model, cfg.optim, "cpu"), trainer_state, cfg,
                               base_dir / "tokenizer.json", keep_last=1).resolve()  # fmt: skip
