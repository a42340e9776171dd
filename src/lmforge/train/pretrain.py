"""Pretraining: next-token prediction on a prepared corpus, from a RunConfig to a run directory.

Order of set-up: data (prepared once, reused) → tokenizer → model (single-device code) →
optimizer → restore a checkpoint if resuming → compile (applied from outside the model) → loop.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from lmforge.config import DataConfig, ModelConfig, RunConfig, load_config, save_config, to_dict
from lmforge.data.loader import BatchLoader, val_batches
from lmforge.data.prepare import load_manifest, prepare_data
from lmforge.data.tokenizer import load_tokenizer, padded_vocab_size
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.evaluate.perplexity import evaluate_loss
from lmforge.infer.generate import complete
from lmforge.models import build_model, model_config
from lmforge.parallel.apply import gradient_sync, parallelize, validate_layout
from lmforge.parallel.mesh import (
    ParallelDims,
    build_mesh,
    dp_rank,
    init_distributed,
    local_device,
    resolve_dims,
    world_size_from_env,
)
from lmforge.runtime import (
    autocast,
    configure_backends,
    peak_flops,
    resolve_device,
    resolve_precision,
    synchronize,
)
from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from lmforge.train.metrics import MetricsLogger
from lmforge.train.optim import build_optimizer
from lmforge.train.pipeline_step import PipelineStep
from lmforge.train.schedule import lr_at


def data_dir_for(cfg: DataConfig, run_dir: Path) -> Path:
    """`data.dir`, or RUN/data by default."""
    return Path(cfg.dir) if cfg.dir else run_dir / "data"


def ensure_data(cfg: DataConfig, run_dir: Path, seed: int) -> Path:
    """The prepared data directory of the run: reused when its manifest exists, else prepared."""
    data_dir = data_dir_for(cfg, run_dir)
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


def run_model_config(cfg: ModelConfig, seq_len: int, tokenizer_vocab: int):
    """The family/flavor config with the run's context length and a vocab that fits the tokenizer."""
    vocab_size = cfg.vocab_size or padded_vocab_size(tokenizer_vocab)
    if vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"config key 'model.vocab_size' is {vocab_size} but the tokenizer has {tokenizer_vocab} tokens"
        )
    try:
        return model_config(cfg.family, cfg.flavor, vocab_size=vocab_size, max_seq_len=seq_len)
    except ValueError as err:
        raise ConfigError(f"config key 'model': {err}") from None


def check_resume_compatible(saved: RunConfig, cfg: RunConfig, run_dir: Path) -> None:
    """A resumed run may change how long it trains, not what it trains."""
    for section in ("model", "data"):
        if to_dict(saved)[section] != to_dict(cfg)[section]:
            raise ConfigError(
                f"cannot resume {run_dir}: config section '{section}' differs from the run's config.yaml "
                f"({to_dict(saved)[section]} vs {to_dict(cfg)[section]})"
            )


def _on_rank0(fn, *args):
    """Run fn on rank 0 only (file writes, data preparation); the others wait, and raise its error too."""
    if not dist.is_initialized():
        return fn(*args)
    error = [None]
    if dist.get_rank() == 0:
        try:
            fn(*args)
        except LmforgeError as err:
            error[0] = str(err)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise LmforgeError(error[0] if dist.get_rank() == 0 else f"rank 0 failed: {error[0]}")


def _global_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks (gloo has no AVG reduction, so sum and divide)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def _full(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (the grad norm under FSDP/TP), else the tensor itself."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _check_start(run_dir: Path, cfg: RunConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); refuses to overwrite or to resume nothing."""
    if resume:
        if not run_dir.is_dir():
            raise CheckpointError(f"cannot resume: run directory {run_dir} does not exist")
        ckpt_dir = latest_checkpoint(run_dir)
        check_resume_compatible(load_config(ckpt_dir / "config.yaml"), cfg, run_dir)
        return ckpt_dir
    if list_checkpoints(run_dir):
        raise CheckpointError(
            f"run directory {run_dir} already has checkpoints: pass --resume, or choose another --out"
        )
    return None


def _build_parallel_model(model_cfg, cfg: RunConfig, dims: ParallelDims, mesh, device: torch.device, dtype):
    """(model, the module the step calls). Sharded layouts of big models are built on the meta
    device and only this rank's shards are ever allocated; otherwise every rank builds the full
    model from the same seed, which is exactly the single-process initialisation."""
    if not dims.distributed:
        model = build_model(model_cfg, device)
        return model, model
    sharded = dims.dp_shard > 1 or dims.tp > 1
    meta_init = cfg.parallel.meta_init
    if meta_init is None:
        meta_init = sharded and build_model(model_cfg, "meta").num_params() >= 1_000_000_000
    if not (meta_init and sharded):
        model = build_model(model_cfg, device)
        return model, parallelize(model, dims, mesh, cfg.parallel, device, dtype)
    model = build_model(model_cfg, "meta")
    step_module = parallelize(model, dims, mesh, cfg.parallel, device, dtype)
    model.to_empty(device=device)
    model.init_weights()
    return model, step_module


def pretrain(cfg: RunConfig, out: str | Path, resume: bool = False) -> dict:
    """Train and return the last evaluation ({"step", "val_loss", "val_ppl"}).

    Under torchrun every process calls this; the layout comes from `cfg.parallel`.
    """
    run_dir = Path(out)
    world_size = world_size_from_env()
    dims = resolve_dims(cfg.parallel, world_size)
    device = local_device(resolve_device(cfg.train.device))
    if dims.distributed:
        init_distributed(device, cfg.parallel.timeout_s)
    try:
        return _pretrain(cfg, run_dir, resume, dims, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _pretrain(cfg: RunConfig, run_dir: Path, resume: bool, dims: ParallelDims, device: torch.device) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    ckpt_dir = _check_start(run_dir, cfg, resume)
    dtype = resolve_precision(cfg.train.precision, device)
    configure_backends(device)
    mesh = build_mesh(dims, device) if dims.distributed else None
    seq_len, micro_batch = cfg.data.seq_len, cfg.train.micro_batch_size
    global_tokens = cfg.train.global_batch_tokens or micro_batch * seq_len * dims.dp
    if global_tokens % (micro_batch * seq_len * dims.dp):
        raise ConfigError(
            f"config key 'train.global_batch_tokens' ({global_tokens}) must be a multiple of "
            f"micro_batch_size * seq_len * data-parallel degree = {micro_batch * seq_len * dims.dp}"
        )
    accum_steps = global_tokens // (micro_batch * seq_len * dims.dp)

    data_dir = data_dir_for(cfg.data, run_dir)
    tokenizer_path = run_dir / "tokenizer.json"

    def prepare_run_dir() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        ensure_data(cfg.data, run_dir, cfg.train.seed)
        if tokenizer_path.resolve() != (data_dir / "tokenizer.json").resolve():
            shutil.copyfile(data_dir / "tokenizer.json", tokenizer_path)

    _on_rank0(prepare_run_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    model_cfg = run_model_config(cfg.model, seq_len, tokenizer.get_vocab_size())
    if dims.distributed:
        validate_layout(model_cfg, dims, cfg.parallel, seq_len, micro_batch * accum_steps)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and in every layout
    pipe = None
    if dims.pp > 1 and dtype == torch.float16:
        raise ConfigError(
            "parallel.pp > 1 does not support train.precision fp16 (no GradScaler in the pipeline): use bf16"
        )
    if dims.pp > 1:
        # The full model is built (same seed everywhere) and pruned to this rank's stages, which
        # then get TP/FSDP like a whole model would.
        model = build_model(model_cfg, device)
        pipe = PipelineStep(model, cfg, mesh["pp"], device, cfg.parallel.pp_microbatches or dims.pp,
                            lambda part: parallelize(part, dims, mesh, cfg.parallel, device, dtype))  # fmt: skip
        parts, optimizers = pipe.parts, pipe.optimizers
        step_module = None
    else:
        model, step_module = _build_parallel_model(model_cfg, cfg, dims, mesh, device, dtype)
        parts, optimizers = [model], [build_optimizer(model, cfg.optim, device.type)]

    dp_rank_index = dp_rank(mesh, dims) if mesh is not None else 0
    loader = BatchLoader(data_dir, "train", micro_batch, seq_len, cfg.train.seed, dp_rank_index, dims.dp)
    step = 0
    if ckpt_dir is not None:
        state = load_checkpoint(ckpt_dir, parts, optimizers)
        step = state["step"]
        loader.load_state_dict(state["loader"])
    _on_rank0(save_config, cfg, run_dir / "config.yaml")

    use_compile = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
    use_compile = use_compile and pipe is None  # pipeline stages run eagerly for now
    train_model = torch.compile(step_module) if use_compile else step_module
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    flops_per_token = model.flops_per_token(seq_len)
    peak, _ = peak_flops(device)
    total_steps, max_steps = cfg.schedule_steps, cfg.train.max_steps
    # Under pp a validation batch is split into the schedule's micro-batches like a training batch.
    val_data = val_batches(
        data_dir, micro_batch * (accum_steps if pipe else 1), seq_len, cfg.train.eval_batches
    )
    log = MetricsLogger(run_dir, cfg.logging, max_steps, step, enabled=rank == 0)
    log.print(
        f"model {cfg.model.family}-{cfg.model.flavor}: {model.num_params() / 1e6:.2f}M params, "
        f"{device.type} {str(dtype).removeprefix('torch.')}, compile={use_compile}, layout {dims}, "
        f"{global_tokens:,} tokens/step ({accum_steps} micro-batches per rank), run directory {run_dir}"
    )

    def evaluate(at_step: int) -> dict:
        # Every rank evaluates the same batches (FSDP needs all ranks in each forward).
        if pipe is not None:
            val_loss = pipe.evaluate(val_data, device)
            record = {"step": at_step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
        else:
            record = {"step": at_step, **evaluate_loss(model, val_data, device, dtype)}
            record.pop("val_tokens")
        log.log_eval(record)
        if cfg.train.sample_tokens > 0 and dims.tp == 1 and pipe is None:
            text = complete(
                model, tokenizer, "def ", cfg.train.sample_tokens, temperature=0.8, top_k=50, seed=at_step
            )
            log.print(f"sample: def {text!r}")
        return record

    def checkpoint(at_step: int) -> None:
        save_checkpoint(run_dir, at_step, parts, optimizers, {"loader": loader.state_dict()}, cfg, tokenizer_path,
                        cfg.checkpoint.keep_last)  # fmt: skip

    last_eval: dict = {}
    started = last_log_time = time.perf_counter()
    last_log_step = step
    while step < max_steps:
        lr = lr_at(step, cfg.schedule, cfg.optim.lr, total_steps)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        if pipe is not None:
            # The schedule splits this rank's accum_steps micro-batches into pipeline micro-batches.
            batches = [loader.next_batch() for _ in range(accum_steps)]
            inputs, targets = (torch.cat(t).to(device, non_blocking=True) for t in zip(*batches, strict=True))
            with autocast(device, dtype):
                loss_sum, grad_norm = pipe.train_step(inputs, targets, max_norm)
        else:
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(accum_steps):
                inputs, targets = (t.to(device, non_blocking=True) for t in loader.next_batch())
                with gradient_sync(step_module, enabled=micro_step == accum_steps - 1):
                    with autocast(device, dtype):
                        logits = train_model(inputs)  # (B, T, V)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / accum_steps
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizers[0])
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        for optimizer in optimizers:
            scaler.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
        scaler.update()
        step += 1
        log.advance()

        if step % cfg.logging.log_every == 0 or step == max_steps:
            # The only host syncs of the loop: .item() on logging steps, never on the others.
            loss_value, grad_norm_value = _global_mean(loss_sum).item(), _full(grad_norm).item()
            synchronize(device)
            now = time.perf_counter()
            tokens_per_sec = global_tokens * (step - last_log_step) / (now - last_log_time)
            log.log_train({
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm_value,
                "tokens_per_sec": tokens_per_sec,
                "mfu": flops_per_token * tokens_per_sec / (peak * dims.world_size) if peak else None,
                "elapsed_s": now - started,
            })  # fmt: skip
            last_log_time, last_log_step = now, step
        paused_at = time.perf_counter()  # evaluation and checkpoints do not count towards tokens/s
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != max_steps:
            last_eval = evaluate(step)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step != max_steps:
            checkpoint(step)
        last_log_time += time.perf_counter() - paused_at

    last_eval = evaluate(step) if not last_eval or last_eval["step"] != step else last_eval
    checkpoint(step)
    log.close()
    return last_eval
