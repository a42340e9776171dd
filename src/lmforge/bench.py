"""`lmforge bench`: training throughput of one model shape on random tokens, as one JSON line.

Random tokens take the data pipeline out of the measurement: what is timed is forward, backward
and the optimizer step, the part lmforge's own code decides.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

import torch

from lmforge.config import OptimConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.models import build_model, model_config
from lmforge.ops.cross_entropy import cross_entropy
from lmforge.runtime import (
    autocast,
    configure_backends,
    peak_flops,
    peak_memory_gib,
    resolve_device,
    resolve_precision,
    synchronize,
)
from lmforge.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.train.compile import CompileMode, CompileScope, apply_compile
from lmforge.train.converters import convert_model
from lmforge.train.optim import build_optimizer


def bench(
    family: Literal["llama", "gpt2"] = "gpt2",
    flavor: str = "124m",
    batch_size: int = 8,
    seq_len: int = 1024,
    steps: int = 20,
    warmup: int = 5,
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    compile: bool | None = None,
    device: str = "auto",
    seed: int = 0,
    fused_loss: bool = True,
    activation_checkpointing: Literal["none", "selective", "full"] = "none",
    compile_scope: CompileScope = "blocks",
    compile_mode: CompileMode = "default",
    fused_projections: bool = False,
    float8: bool = False,
    optimizer: Literal["adamw", "muon"] = "adamw",
    profile: str | None = None,
    vocab_size: int | None = None,
) -> dict:
    """Train on random tokens and report tokens_per_sec, mfu, peak_mem_gib, step_ms.

    Args:
        family: llama or gpt2.
        flavor: debug, tiny, 124m, 350m, 1b, 7b, 70b, 175b.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        steps: Timed steps.
        warmup: Untimed steps first (compilation, allocator warm-up).
        precision: auto, fp32, bf16 or fp16.
        compile: torch.compile the model (default: on for CUDA).
        device: auto, cpu, cuda or cuda:N.
        seed: Seed of the weights and the random tokens.
        fused_loss: Compute the loss without materialising the logits, as pretraining does by default.
        activation_checkpointing: none, selective (every other block) or full: recompute activations in backward.
        compile_scope: blocks (each block compiled on its own) or model (one graph).
        compile_mode: torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs.
        fused_projections: llama: one matmul for q, k, v and one for gate and up.
        float8: torchao float8 training of the block's linear layers (GPU of compute capability >= 8.9).
        optimizer: adamw (fused on CUDA) or muon.
        profile: After timing, profile 3 more steps with torch.profiler: write a Chrome/Perfetto trace to this path and print the 15 ops with the most self time to stderr.
        vocab_size: The model's vocabulary (default: the flavor's).
    """
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    configure_backends(dev)
    torch.manual_seed(seed)
    try:
        overrides = {"vocab_size": vocab_size} if vocab_size is not None else {}
        model_cfg = model_config(family, flavor, max_seq_len=seq_len, **overrides)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    model = build_model(model_cfg, dev)
    convert_model(model, TrainConfig(fused_projections=fused_projections, float8=float8), 1, dev)
    apply_activation_checkpointing(model, activation_checkpointing)
    opt = build_optimizer(model, OptimConfig(name=optimizer), dev.type)
    use_compile = compile if compile is not None else dev.type == "cuda"
    train_model = apply_compile(model, model, compile_scope, compile_mode) if use_compile else model
    vocab = model.cfg.vocab_size
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)

    def step() -> None:
        tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), device=dev)
        with autocast(dev, dtype):
            if fused_loss:
                loss = train_model(tokens[:, :-1], targets=tokens[:, 1:])
            else:
                loss = cross_entropy(train_model(tokens[:, :-1]), tokens[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    synchronize(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(dev)
    elapsed = time.perf_counter() - started

    if profile is not None:
        _profile(step, dev, Path(profile))

    tokens_per_sec = batch_size * seq_len * steps / elapsed
    peak, peak_source = peak_flops(dev)
    flops_per_token = model.flops_per_token(seq_len)
    return {
        "family": family,
        "flavor": flavor,
        "params": model.num_params(),
        "vocab_size": vocab,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": f"{compile_scope}/{compile_mode}" if use_compile else False,
        "fused_projections": fused_projections,
        "float8": float8,
        "activation_checkpointing": activation_checkpointing,
        "optimizer": optimizer,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
        "tokens_per_sec": tokens_per_sec,
        "step_ms": 1000 * elapsed / steps,
        "mfu": flops_per_token * tokens_per_sec / peak if peak else None,
        "mfu_peak": peak_source,
        "flops_per_token": flops_per_token,
        "peak_mem_gib": peak_memory_gib(dev),
    }


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
