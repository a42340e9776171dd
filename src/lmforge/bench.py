"""`lmforge bench`: training throughput of one model shape on random tokens, as one JSON line.

Random tokens take the data pipeline out of the measurement: what is timed is forward, backward
and the optimizer step, the part lmforge's own code decides.

`--layout fsdp` and `--layout pipeline` wrap the model as pretraining does under parallel.dp_shard > 1
or parallel.pp > 1, but on this one process (a process group of one): what the wrapping itself costs
on one device, beside the plain model (`--layout plain`) on the same batches. Every layout draws the
same weights and tokens from `seed`, so their final losses agree (to rounding): the same work is timed.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.torch_version import TorchVersion

from lmforge.adapt.freeze import trainable_counts
from lmforge.config import LoraConfig, OptimConfig, ParallelConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.models import blocks, build_model, model_config
from lmforge.ops.cross_entropy import cross_entropy
from lmforge.parallel.apply import ModelLayout
from lmforge.parallel.mesh import local_device
from lmforge.parallel.pipeline import validate_pp
from lmforge.runtime import (
    configure_backends,
    peak_flops,
    peak_memory_gib,
    resolve_device,
    resolve_precision,
    synchronize,
)
from lmforge.train.compile import CompileMode, CompileScope
from lmforge.train.objective import next_token_loss
from lmforge.train.pipeline_step import PipelineStep, stages_per_rank
from lmforge.train.step import build_train_step
from lmforge.train.transforms import compile_enabled

Layout = Literal["plain", "fsdp", "pipeline"]


def bench(
    family: str = "gpt2",
    flavor: str = "124m",
    batch_size: int = 8,
    seq_len: int = 1024,
    steps: int = 20,
    warmup: int = 5,
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    compile: bool | None = None,
    device: str = "auto",
    seed: int = 0,
    fused_loss: bool | None = None,
    activation_checkpointing: Literal["none", "selective", "full"] = "none",
    compile_scope: CompileScope = "blocks",
    compile_mode: CompileMode = "default",
    fused_projections: bool = False,
    float8: bool = False,
    optimizer: Literal["adamw", "muon"] = "adamw",
    profile: str | None = None,
    vocab_size: int | None = None,
    layout: Layout = "plain",
    microbatches: int = 1,
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b",
    fsdp_reshard_after_forward: bool = True,
    lora_rank: int = 0,
    lora_targets: list[str] | None = None,
) -> dict:
    """Train on random tokens and report tokens_per_sec, mfu, peak_mem_gib, step_ms, warmup_s (the
    untimed steps, compilation included) and the last loss.

    Args:
        family: A model family of lmforge.models.FAMILIES: llama, gpt2.
        flavor: debug, tiny, 124m, 350m, 1b, 7b, 70b, 175b.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        steps: Timed steps.
        warmup: Untimed steps first (compilation, allocator warm-up).
        precision: auto, fp32, bf16 or fp16.
        compile: torch.compile the model (default: on for CUDA, except with layout pipeline, whose stages run eagerly as in pretraining).
        device: auto, cpu, cuda or cuda:N.
        seed: Seed of the weights and the random tokens.
        fused_loss: Compute the loss without materialising the logits, as pretraining does by default (default: on, except with layout pipeline).
        activation_checkpointing: none, selective (every other block) or full: recompute activations in backward.
        compile_scope: blocks (each block compiled on its own) or model (one graph).
        compile_mode: torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs.
        fused_projections: llama: one matmul for q, k, v and one for gate and up.
        float8: torchao float8 training of the block's linear layers (GPU of compute capability >= 8.9).
        optimizer: adamw (fused on CUDA) or muon.
        profile: After timing, profile 3 more steps with torch.profiler: write a Chrome/Perfetto trace to this path and print the 15 ops with the most self time to stderr.
        vocab_size: The model's vocabulary (default: the flavor's).
        layout: plain (the model as built), fsdp (FSDP2 fully_shard per block, parameters gathered in the compute dtype, as parallel.dp_shard > 1 trains) or pipeline (torch.distributed.pipelining stages and schedule, as parallel.pp > 1), on a process group of this one process: what the wrapping costs on one device.
        microbatches: Split each step's batch into this many micro-batches: gradient accumulation (plain, fsdp) or the pipeline schedule's micro-batches.
        pp_schedule: The schedule of layout pipeline: gpipe, 1f1b, or interleaved_1f1b (two stages on this process).
        fsdp_reshard_after_forward: Layout fsdp: free the gathered parameters after forward and gather them again in backward.
        lora_rank: Train LoRA adapters of this rank instead of every weight (alpha 16, as fine-tuning's lora section); 0: all weights train.
        lora_targets: The linear layers that get adapters (lora.targets; default: attention).
    """
    for flag, value, least in (("batch-size", batch_size, 1), ("seq-len", seq_len, 1), ("steps", steps, 1),
                               ("warmup", warmup, 0)):  # fmt: skip
        if value < least:
            raise ConfigError(f"bench: --{flag} must be >= {least}, got {value}")
    dev = local_device(resolve_device(device))  # with its index: the layouts' process group needs it
    dtype = resolve_precision(precision, dev)
    _check_layout(layout, microbatches, batch_size, compile, fused_loss, dtype, optimizer, pp_schedule)
    fused_loss = fused_loss if fused_loss is not None else layout != "pipeline"
    configure_backends(dev)
    torch.manual_seed(seed)
    try:
        overrides = {"vocab_size": vocab_size} if vocab_size is not None else {}
        model_cfg = model_config(family, flavor, max_seq_len=seq_len, **overrides)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    train_cfg = TrainConfig(
        grad_clip=1.0, compile=compile, compile_scope=compile_scope, compile_mode=compile_mode,
        fused_projections=fused_projections, float8=float8, activation_checkpointing=activation_checkpointing,
    )  # fmt: skip
    use_compile = compile_enabled(train_cfg, dev, pipeline=layout == "pipeline")  # as pretraining resolves it
    parallel_cfg = ParallelConfig(pp_schedule=pp_schedule, pp_microbatches=microbatches,
                                  fsdp_reshard_after_forward=fsdp_reshard_after_forward)  # fmt: skip
    meta = build_model(model_cfg, "meta")
    facts = {
        "params": meta.num_params(),
        "vocab": model_cfg.vocab_size,
        "flops_per_token": meta.flops_per_token(seq_len),
    }
    loss_fn = next_token_loss(fused_loss)
    lora_cfg = LoraConfig(rank=lora_rank, targets=lora_targets or ["attention"])

    def measure(mesh: DeviceMesh | None) -> dict:
        """Build, wrap and time; everything built here is freed on return, before the process
        group of the layouts is destroyed."""
        if layout == "pipeline":
            try:
                validate_pp(
                    model_cfg.n_layers,
                    1,
                    stages_per_rank(pp_schedule),
                    microbatches,
                    microbatches,
                    pp_schedule,
                )
            except ValueError as err:
                raise ConfigError(f"bench --layout pipeline: {err}") from None
        model_layout = ModelLayout(dp_mesh=mesh, data_parallel="fsdp") if layout == "fsdp" else ModelLayout()
        step = build_train_step(model_cfg, train_cfg, parallel_cfg, OptimConfig(name=optimizer), model_layout, dev,
                                dtype, pp_mesh=mesh if layout == "pipeline" else None,
                                pipeline_loss=cross_entropy, lora=lora_cfg)  # fmt: skip
        measured: dict[str, Any] = {"wrapped": _describe(step.parts, step.pipe),
                                    "trainable": trainable_counts(step.parts)[0]}  # fmt: skip
        losses: list[torch.Tensor] = []

        def one_step() -> None:
            tokens = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len + 1), device=dev)
            batches = [(micro[:, :-1], micro[:, 1:]) for micro in tokens.chunk(microbatches)]
            loss, _ = step.forward_backward(batches, loss_fn, len(losses) + 1)
            step.update(skip=False)
            losses.append(loss)

        warmup_started = time.perf_counter()
        for _ in range(warmup):
            one_step()
        synchronize(dev)
        measured["warmup_s"] = time.perf_counter() - warmup_started  # includes compiling
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        started = time.perf_counter()
        for _ in range(steps):
            one_step()
        synchronize(dev)
        measured["elapsed"] = time.perf_counter() - started
        measured["peak_mem_gib"] = peak_memory_gib(dev)
        measured["loss"] = losses[-1].item() if losses else None  # the last timed (or warm-up) step's
        if profile is not None:
            _profile(one_step, dev, Path(profile))
        return measured

    with _process_group_of_one(dev, layout) as mesh:
        measured = measure(mesh)
    elapsed, flops_per_token = measured["elapsed"], facts["flops_per_token"]
    tokens_per_sec = batch_size * seq_len * steps / elapsed
    peak, peak_source = peak_flops(dev)
    return {
        "family": family,
        "flavor": flavor,
        "params": facts["params"],
        "vocab_size": facts["vocab"],
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": f"{compile_scope}/{compile_mode}" if use_compile else False,
        "fused_projections": fused_projections,
        "float8": float8,
        "activation_checkpointing": activation_checkpointing,
        "optimizer": optimizer,
        "lora": f"rank {lora_rank} on {','.join(lora_cfg.targets)}" if lora_rank else None,
        "trainable_params": measured["trainable"],
        "layout": layout if layout != "pipeline" else f"pipeline {pp_schedule}",
        "wrapped": measured["wrapped"],
        "microbatches": microbatches,
        "fused_loss": fused_loss,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
        "tokens_per_sec": tokens_per_sec,
        "step_ms": 1000 * elapsed / steps,
        "warmup_s": measured["warmup_s"],
        "mfu": flops_per_token * tokens_per_sec / peak if peak else None,
        "mfu_peak": peak_source,
        "flops_per_token": flops_per_token,
        "peak_mem_gib": measured["peak_mem_gib"],
        "loss": measured["loss"],
    }


def interleaving_on_one_process() -> bool:
    """Whether torch's interleaved 1F1B can run both stages on one process: torch 2.13 passes
    activations between a process's adjacent stages directly; torch 2.11's stage shape inference
    still sends them to itself, which fails on a group of one (both checked on CPU with gloo)."""
    return TorchVersion(torch.__version__) >= "2.13"


def _check_layout(
    layout: Layout, microbatches: int, batch_size: int, compile: bool | None, fused_loss: bool | None,
    dtype: torch.dtype, optimizer: str, pp_schedule: str,
) -> None:  # fmt: skip
    if microbatches < 1 or batch_size % microbatches:
        raise ConfigError(f"bench: batch_size {batch_size} does not split into microbatches={microbatches}")
    if layout == "fsdp" and optimizer == "muon":
        raise ConfigError("bench: --optimizer muon orthogonalises whole matrices, which --layout fsdp shards")
    if layout != "pipeline":
        return
    for name, value, why in (
        ("compile", compile, "pipeline stages run eagerly, as in pretraining"),
        ("fused_loss", fused_loss, "the pipeline's loss takes the last stage's logits"),
    ):
        if value:
            raise ConfigError(f"bench: --{name} true is not supported with --layout pipeline ({why})")
    if pp_schedule == "interleaved_1f1b" and not interleaving_on_one_process():
        raise ConfigError(
            f"bench: --pp-schedule interleaved_1f1b on one process needs torch >= 2.13; torch {torch.__version__}'s "
            "pipelining sends between the process's own two stages, which a group of one cannot do"
        )
    if dtype == torch.float16:
        raise ConfigError(
            "bench: --layout pipeline does not support fp16 (no GradScaler in the pipeline): use bf16"
        )


@contextlib.contextmanager
def _process_group_of_one(dev: torch.device, layout: Layout) -> Iterator[DeviceMesh | None]:
    """A one-process mesh for the fsdp and pipeline layouts (None for plain), and its process group
    unless one exists (it must then be of one process: bench measures one device)."""
    if layout == "plain":
        yield None
        return
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConfigError(
                f"bench measures one process; this one is in a group of {dist.get_world_size()}"
            )
        yield init_device_mesh(dev.type, (1,), mesh_dim_names=(layout,))
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as store:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}/store", rank=0, world_size=1)
        try:
            yield init_device_mesh(dev.type, (1,), mesh_dim_names=(layout,))
        finally:
            # As pretrain does: free what still holds the group (cycles) before it goes, not at
            # interpreter teardown, where gloo's threads can abort the process.
            gc.collect()
            dist.destroy_process_group()
            gc.collect()


def _describe(parts: list[nn.Module], pipe: PipelineStep | None) -> str:
    """What the layout made of the model, checkable in the JSON line: FSDP units or pipeline stages."""
    if pipe is not None:
        layers = ["+".join(blocks(part)) for part in parts]
        return f"{len(parts)} pipeline stage(s) on this process, layers " + " | ".join(layers)
    units = sum(isinstance(module, FSDPModule) for module in parts[0].modules())
    return f"{units} FSDP2 units" if units else "not wrapped"


def _profile(step, dev: torch.device, trace: Path, steps: int = 3) -> None:
    """Where a step's time goes: torch.profiler over `steps` steps, a trace file and a top-ops table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profiler(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        synchronize(dev)
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    sort_by = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15), file=sys.stderr)
