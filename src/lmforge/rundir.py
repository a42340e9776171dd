"""The run-directory format: what every command reads and writes, in one module.

    RUN/config.yaml          the resolved config (lmforge.config)
    RUN/tokenizer.json       Hugging Face tokenizers format
    RUN/data/                the prepared corpus, unless data.dir points elsewhere
    RUN/checkpoints/step_0000100/
        model/               weights, safetensors (torch.distributed.checkpoint's Hugging Face writer)
        optimizer/           optimizer tensors, safetensors (written by lmforge.train.checkpoint)
        trainer_state.json   step, data position, non-finite guard, loss scale, RNG states, optimizer scalars
        config.yaml, tokenizer.json
        manifest.json        written last: every file with its size and sha256, the step, the config hash

This module finds and verifies checkpoints, resolves a run or checkpoint directory, its data
directory and its model config, builds its model on the meta device and loads its weights. It
imports neither the trainer nor torch.distributed's pipelining, so `lmforge.load(RUN)` stays light;
writing checkpoints (and restoring optimizer state) is the trainer's (lmforge.train.checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from lmforge.adapt.lora import apply_lora, merge_state
from lmforge.config import DataConfig, LoraConfig, ModelConfig, load_config, one_line, to_dict
from lmforge.data.classify import prepare_classify
from lmforge.data.prepare import load_manifest, prepare_data
from lmforge.data.sft import prepare_sft
from lmforge.data.tokenizer import load_tokenizer, padded_vocab_size
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import FamilyConfig, FamilyModel, build_model, family_spec, model_config, spec_of
from lmforge.runtime import resolve_precision

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import ValueType

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- data and model


def data_dir_for(cfg: DataConfig, run_dir: Path) -> Path:
    """`data.dir`, or RUN/data by default."""
    return Path(cfg.dir) if cfg.dir else run_dir / "data"


def ensure_data(cfg: DataConfig, run_dir: Path, seed: int) -> Path:
    """The prepared data directory of the run: reused when its manifest exists, else prepared."""
    data_dir = data_dir_for(cfg, run_dir)
    if cfg.task in ("sft", "classify"):
        return _ensure_task_data(cfg, data_dir, seed)
    if (data_dir / "manifest.json").is_file():
        manifest = load_manifest(data_dir)
        if cfg.tokenizer is None and manifest["requested_vocab_size"] != cfg.vocab_size:
            raise ConfigError(
                f"data directory {data_dir} was prepared with vocab_size {manifest['requested_vocab_size']}, "
                f"config key 'data.vocab_size' is {cfg.vocab_size}: use another data.dir"
            )
        return data_dir
    prepare_data(
        cfg.source,
        data_dir,
        vocab_size=cfg.vocab_size,
        val_fraction=cfg.val_fraction,
        seed=seed,
        num_workers=cfg.num_workers,
        tokenizer_path=cfg.tokenizer,
    )
    return data_dir


def _ensure_task_data(cfg: DataConfig, data_dir: Path, seed: int) -> Path:
    """An SFT or classification data directory (lmforge.data.sft, lmforge.data.classify), prepared
    from cfg.source with cfg.tokenizer unless it exists; one prepared for another task is refused."""
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        if cfg.tokenizer is None:
            raise ConfigError(
                f"config key 'data.task' is {cfg.task}: it needs data.tokenizer (lmforge finetune --init sets it)"
            )
        prepare = prepare_sft if cfg.task == "sft" else prepare_classify
        prepare(cfg.source, data_dir, cfg.tokenizer, cfg.seq_len, cfg.val_fraction, seed, cfg.malformed)
        return data_dir
    try:
        kind = json.loads(manifest_path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != cfg.task:
        raise ConfigError(
            f"data directory {data_dir} was not prepared for config key 'data.task' {cfg.task}: use another data.dir"
        )
    prepared_len = json.loads(manifest_path.read_text()).get("seq_len")
    if prepared_len != cfg.seq_len:
        raise ConfigError(
            f"data directory {data_dir} was prepared with seq_len {prepared_len}, config key 'data.seq_len' is "
            f"{cfg.seq_len}: use another data.dir"
        )
    return data_dir


def run_model_config(cfg: ModelConfig, seq_len: int, tokenizer_vocab: int) -> FamilyConfig:
    """The family/flavor config with the run's context length and a vocab that fits the tokenizer."""
    vocab_size = cfg.vocab_size or padded_vocab_size(tokenizer_vocab)
    if vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"config key 'model.vocab_size' is {vocab_size} but the tokenizer has {tokenizer_vocab} tokens"
        )
    _check_shape_keys(cfg)
    overrides: dict[str, object] = {**(cfg.shape or {}), **({"qk_norm": True} if cfg.qk_norm else {})}
    try:
        return model_config(cfg.family, cfg.flavor, vocab_size=vocab_size, max_seq_len=seq_len, **overrides)
    except (ValueError, TypeError) as err:  # TypeError: a string where the family wants a number
        raise ConfigError(f"config key 'model': {err}") from None


def check_model_section(cfg: ModelConfig) -> None:
    """ConfigError naming the key unless the family, flavor and switches exist (before any work)."""
    try:
        spec = family_spec(cfg.family)
    except ValueError as err:
        raise ConfigError(f"config key 'model.family': {err}") from None
    if cfg.qk_norm and "qk_norm" not in {f.name for f in dataclasses.fields(spec.config)}:
        raise ConfigError(
            f"config key 'model.qk_norm' must be false for family {cfg.family} (it has no QK-norm)"
        )
    try:
        model_config(cfg.family, cfg.flavor)
    except ValueError as err:
        raise ConfigError(f"config key 'model.flavor': {err}") from None
    _check_shape_keys(cfg)
    try:
        model_config(cfg.family, cfg.flavor, **(cfg.shape or {}))
    except (ValueError, TypeError) as err:  # TypeError: a string where the family wants a number
        raise ConfigError(f"config key 'model.shape': {err}") from None


def _check_shape_keys(cfg: ModelConfig) -> None:
    reserved = sorted(set(cfg.shape or {}) & {"vocab_size", "max_seq_len"})
    if reserved:
        raise ConfigError(
            f"config key 'model.shape' sets {reserved}: use model.vocab_size and data.seq_len instead"
        )


def meta_model(ckpt_dir: Path) -> FamilyModel:
    """The checkpoint's model, built from its config.yaml and tokenizer.json on the meta device (with
    LoRA adapters for a LoRA run: lmforge.adapt.lora.merge_lora folds them in)."""
    cfg = load_config(ckpt_dir / "config.yaml")
    tokenizer = load_tokenizer(ckpt_dir / "tokenizer.json")
    model_cfg = run_model_config(cfg.model, cfg.data.seq_len, tokenizer.get_vocab_size())
    model = build_model(model_cfg, device="meta")
    apply_lora(model, cfg.lora)  # a LoRA run's checkpoint holds its adapters beside the base weights
    return model


def run_precision(ckpt_dir: Path, device: torch.device) -> torch.dtype:
    """The compute dtype for evaluating (and generating in batches) with a checkpoint on `device`: the one its run
    trained in (config.yaml's train.precision), except that on a CPU a run trained in bf16 or fp16
    gets what `auto` picks there (bf16 where the CPU computes it natively, fp32 where it would only
    emulate it, and CPUs have no fp16 autocast)."""
    precision = load_config(ckpt_dir / "config.yaml").train.precision
    if device.type == "cpu" and precision != "fp32":
        precision = "auto"
    return resolve_precision(precision, device)


def decode_precision(ckpt_dir: Path, device: torch.device, compiled: bool = False) -> torch.dtype:
    """The compute dtype for generating one sequence with a checkpoint on `device`: run_precision,
    except fp32 on a CPU for a model of plain weights. A decode step multiplies one row by every
    weight matrix, and there PyTorch's fp32 matrix-vector product beats bf16's while bf16 autocast
    over fp32 weights converts every weight at every step (measured, llama 124m shape, batch 1, 2
    threads: fp32 31.7 tokens/s, bf16 autocast 9.6, bf16 weights 29.9). A weight-only quantized model
    keeps the run's precision eagerly: its CPU kernels compute in bf16 (lmforge.compress.quantize);
    int8-weight's compiled step (`compiled`) reads the int8 weights itself and is fastest in fp32
    (measured, same shape: 71.1 tokens/s against 60.8 under bf16 autocast,
    benchmarks/RESULTS.md); int8-dynamic's integer
    matmul takes fp32 activations."""
    quantize = load_config(ckpt_dir / "config.yaml").compress.quantize
    if device.type == "cpu" and (
        quantize in (None, "", "int8-dynamic") or (compiled and quantize == "int8-weight")
    ):
        return torch.float32
    return run_precision(ckpt_dir, device)


# ---------------------------------------------------------------------------- checkpoints: find, verify


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(ckpt_dir: Path) -> dict:
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint manifest {path} is corrupt ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint manifest {path} is corrupt: 'files' is not a mapping")
    for name, meta in files.items():
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("bytes"), int)
            and isinstance(meta.get("sha256"), str)
        ):
            raise CheckpointError(
                f"checkpoint manifest {path} is corrupt: entry '{name}' lacks bytes or sha256"
            )
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"checkpoint manifest {path} names a file outside the checkpoint: '{name}'")
    return manifest


def verify_checkpoint(ckpt_dir: Path, checksums: bool = True) -> dict:
    """Check every file the manifest lists: present, right size and (optionally) right sha256."""
    manifest = read_manifest(ckpt_dir)
    # A file the manifest does not list would still be read (DCP loads every *.safetensors file
    # of a directory): refuse it.
    listed = set(manifest["files"]) | {MANIFEST}
    for path in sorted(ckpt_dir.rglob("*")):
        if path.is_file() and str(path.relative_to(ckpt_dir)) not in listed:
            raise CheckpointError(f"checkpoint file {path} is not in the manifest")
    for name, meta in manifest["files"].items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
            )
        if checksums and sha256_file(path) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt: its sha256 differs from the manifest's"
            )
    return manifest


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (complete or not)."""
    return sorted((run_dir / "checkpoints").glob("step_*"))


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint that verifies; older ones are tried with a warning naming the bad one.

    Raises CheckpointError if there is none: a resume never silently starts from scratch.
    """
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"run directory {run_dir} has no checkpoint to resume from")
    for ckpt_dir in reversed(candidates):
        try:
            verify_checkpoint(ckpt_dir)
            return ckpt_dir
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint {ckpt_dir.name}: {err}", stacklevel=2)
            reason = str(err)
    raise CheckpointError(
        f"run directory {run_dir} has no valid checkpoint (all {len(candidates)} failed verification; "
        f"the oldest: {reason})"
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its newest valid checkpoint) or a checkpoint directory (verified)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"run or checkpoint directory {path} does not exist")
    if (path / MANIFEST).is_file():
        verify_checkpoint(path)
        return path
    if (path / "checkpoints").is_dir():
        return latest_checkpoint(path)
    raise CheckpointError(f"{path} is neither a run directory nor a checkpoint directory")


# ---------------------------------------------------------------------------- weights


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def tensor_headers(directory: Path) -> dict[str, list[int]]:
    """Name → shape of every tensor in the safetensors files of `directory`, from the headers only.

    Parsing is safetensors' own (bounded: it refuses a header over 100 MB before reading it); any
    file it cannot parse is a CheckpointError naming the file.
    """
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint directory {directory} has no .safetensors file")
    headers = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    headers[key] = f.get_slice(key).get_shape()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"checkpoint file {file} is not a valid safetensors file ({err})") from None
    return headers


def load_tensors(template: dict[str, torch.Tensor], directory: Path) -> None:
    """Fill `template` in place (plain tensors or this rank's DTensor shards) from `directory`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        reader = dcp.HuggingFaceStorageReader(str(directory))
        try:
            dcp.load(template, storage_reader=reader, no_dist=not _distributed())
        except (dcp.CheckpointException, SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"cannot read the tensors of {directory}: {one_line(str(err))[:300]}"
            ) from None


def _tied_names(model: nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (e.g. gpt2's lm_head.weight)."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def head_alias(part: nn.Module) -> dict[str, str]:
    """On a last pipeline stage, the copy of a tied head is stored under the embedding's name.

    The checkpoint then holds one tied weight whatever the layout: a single process (where the
    head *is* the embedding) and a pipeline (where first and last stage each hold a copy) read and
    write the same tensor.
    """
    stages = spec_of(part).stages
    embedding, head = stages.embedding, stages.head
    if (
        stages.ties_embeddings(part.cfg)
        and getattr(part, embedding) is None
        and getattr(part, head) is not None
    ):
        return {f"{head}.weight": f"{embedding}.weight"}
    return {}


def model_state_dict(part: nn.Module) -> dict[str, torch.Tensor]:
    """Weights by checkpoint name (DTensor shards under FSDP/TP); a tied weight appears once."""
    tied, alias = _tied_names(part), head_alias(part)
    weights = cast(dict[str, torch.Tensor], get_model_state_dict(part))  # a model's state: tensors only
    return {alias.get(name, name): t for name, t in weights.items() if name not in tied}


def check_weight_shapes(expected: dict[str, torch.Tensor], weights_dir: Path) -> None:
    """CheckpointError unless the safetensors files of `weights_dir` hold every expected tensor in
    its expected shape (read from the headers: nothing is loaded)."""
    headers = tensor_headers(weights_dir)
    for name, tensor in expected.items():
        if name not in headers:
            raise CheckpointError(f"checkpoint {weights_dir} has no tensor '{name}'")
        if list(tensor.shape) != list(headers[name]):
            raise CheckpointError(
                f"checkpoint {weights_dir}: tensor '{name}' has shape {list(headers[name])}, "
                f"the model expects {list(tensor.shape)}"
            )


def load_model_weights(
    parts: nn.Module | list[nn.Module], weights_dir: Path, exclude: Callable[[str], bool] | None = None
) -> None:
    """Load safetensors weights into the model (or its pipeline stages) in place, shapes checked.
    exclude: names of weights not to load (a fine-tuning run's adapters, absent from its base)."""
    parts = parts if isinstance(parts, list) else [parts]
    templates = [
        {k: v for k, v in model_state_dict(part).items() if exclude is None or not exclude(k)}
        for part in parts
    ]
    check_weight_shapes({k: v for template in templates for k, v in template.items()}, weights_dir)
    for part, template in zip(parts, templates, strict=True):
        # One load per part: a rank may hold the same checkpoint tensor twice (never here, as the
        # first and last pipeline stages are on different ranks, but a dict could not say so).
        load_tensors(template, weights_dir)
        unalias = {v: k for k, v in head_alias(part).items()}
        state: dict[str, ValueType] = {unalias.get(name, name): t for name, t in template.items()}
        set_model_state_dict(part, state, options=StateDictOptions(strict=False))
        if isinstance(part, FamilyModel) and not head_alias(part):
            part.tie_weights()


def checkpoint_weights(ckpt_dir: Path, merge_adapters: bool = True) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint as a whole tensor, by checkpoint name, shapes checked against its
    config (a tied weight once, under the embedding's name). Holds them all in memory.
    merge_adapters: a LoRA run's adapters folded into the weights they adapt (the model it computes);
    False: as saved, adapters apart."""
    check_weight_shapes(model_state_dict(meta_model(ckpt_dir)), ckpt_dir / "model")
    weights = {}
    for file in sorted((ckpt_dir / "model").glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                weights[key] = f.get_tensor(key)
    lora = load_config(ckpt_dir / "config.yaml").lora
    return merge_state(weights, lora) if merge_adapters and lora.rank else weights


def write_export(
    out_dir: Path,
    weights: dict[str, torch.Tensor],
    metadata: dict[str, str],
    copies: dict[str, Path],
    texts: dict[str, str] | None = None,
    weights_name: str = "model.safetensors",
) -> Path:
    """Write an export directory: OUT/model.safetensors (`weights`, with `metadata`; or OUT/weights_name), the files
    `copies` names (OUT/name <- path) and `texts` (OUT/name <- content). Each goes to a temporary
    name that is renamed into place, the weights last, so that a model.safetensors is never next to
    the config of another export. Returns the weights' path."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / weights_name).unlink(missing_ok=True)
    for name, content in (texts or {}).items():
        (out_dir / f".{name}.tmp").write_text(content)
        os.replace(out_dir / f".{name}.tmp", out_dir / name)
    for name, source in copies.items():
        shutil.copyfile(source, out_dir / f".{name}.tmp")
        os.replace(out_dir / f".{name}.tmp", out_dir / name)
    save_file(weights, str(out_dir / f".{weights_name}.tmp"), metadata=metadata)
    os.replace(out_dir / f".{weights_name}.tmp", out_dir / weights_name)
    return out_dir / weights_name


def export_checkpoint(ckpt_dir: Path, out_dir: Path) -> Path:
    """OUT/model.safetensors with every weight of the checkpoint (whole tensors, one file; LoRA
    adapters merged), plus config.yaml and tokenizer.json (write_export). Holds the weights in memory."""
    cfg = load_config(ckpt_dir / "config.yaml")
    merged = dataclasses.replace(cfg, lora=LoraConfig())  # the exported weights have no adapters
    return write_export(
        out_dir,
        checkpoint_weights(ckpt_dir),
        {"format": "pt", "step": str(read_manifest(ckpt_dir)["step"])},
        {"tokenizer.json": ckpt_dir / "tokenizer.json"},
        {"config.yaml": yaml.safe_dump(to_dict(merged), sort_keys=False)},
    )
