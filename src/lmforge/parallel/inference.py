"""A checkpoint loaded for generation over a tensor-parallel mesh (`lmforge generate --tp N` under
torchrun): for a model too large for one device, each rank holds 1/N of every block's matmuls.

The model is built on the meta device, sharded (lmforge.parallel.tensor, without sequence
parallelism: a decode step has one position), then materialised and filled from the safetensors
files, each rank reading only its own shard of every weight (load_model_weights with a template of
DTensors). The KV caches hold each rank's own heads (lmforge.models.kv_cache.local_heads), every
rank takes the same token ids and gets the same full logits, and so every rank samples the same
tokens (greedy, or seeded alike): one rank prints or writes them.

The processes form a 2-D mesh (dp, tp): tp consecutive ranks share one model; the dp groups split a
prompts file between them (lmforge.infer.files).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.models import FamilyModel, spec_of
from lmforge.parallel.tensor import apply_tensor_parallel, validate_tp
from lmforge.rundir import load_model_weights, meta_model


def inference_mesh(device: torch.device, world_size: int, tp: int) -> DeviceMesh:
    """The (dp, tp) mesh of `world_size` processes, tp consecutive ranks per model (tp divides it)."""
    return init_device_mesh(device.type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def check_tensor_parallel(ckpt_dir: Path, tp: int) -> None:
    """ConfigError (one line) for a checkpoint that cannot be split over `tp` processes: a quantized
    or LoRA run, an encoder, or a shape that does not split (lmforge.parallel.tensor.validate_tp:
    the heads, and the widths of the matmuls). Reads the config only."""
    cfg = load_config(ckpt_dir / "config.yaml")
    if cfg.compress.quantize:
        raise ConfigError(
            f"{ckpt_dir} is quantized ({cfg.compress.quantize}): --tp needs a model of plain weights"
        )
    if cfg.lora.rank:
        raise ConfigError(
            f"{ckpt_dir} is a LoRA run: merge its adapters first (lmforge export --format hf, then lmforge import) "
            "to generate with --tp"
        )
    model = meta_model(ckpt_dir)
    if spec_of(model).encoder:
        raise ConfigError(
            f"{ckpt_dir} is an encoder (model family {spec_of(model).name}): it does not generate text"
        )
    try:
        validate_tp(model.cfg, tp)
    except ValueError as error:
        raise ConfigError(f"--tp {tp}: {error}") from None


def load_tensor_parallel(ckpt_dir: Path, tp_mesh: DeviceMesh, device: torch.device) -> FamilyModel:
    """The checkpoint's model (eval mode, fp32) sharded over `tp_mesh` (check_tensor_parallel first)."""
    model = meta_model(ckpt_dir)
    apply_tensor_parallel(model, tp_mesh, sequence_parallel=False)
    model.to_empty(device=device)
    model.init_weights()  # fills the buffers that are not saved (RoPE tables) and re-ties the head
    load_model_weights(model, ckpt_dir / "model")  # each rank reads its own shards
    return model.eval()


def shared_seed() -> int:
    """A random sampling seed drawn by rank 0 and given to every process: the processes of one
    tensor-parallel model must sample the same tokens (each would otherwise seed from the OS, feed
    the model other tokens and leave the collectives out of step)."""
    seed = [int(torch.randint(0, 2**62, ()).item()) if dist.get_rank() == 0 else 0]
    dist.broadcast_object_list(seed, src=0)
    return seed[0]
