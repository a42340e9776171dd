"""Pretraining: next-token prediction on a prepared corpus, from a RunConfig to a run directory.

Order of set-up: data (prepared once, reused) → tokenizer → model (single-device code) →
optimizer → restore a checkpoint if resuming → compile (applied from outside the model) → loop.
"""

from __future__ import annotations

import gc
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lmforge.config import DataConfig, ModelConfig, RunConfig, load_config, save_config, to_dict
from lmforge.data.loader import BatchLoader, val_batches
from lmforge.data.prepare import load_manifest, prepare_data
from lmforge.data.tokenizer import load_tokenizer, padded_vocab_size
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.evaluate.perplexity import evaluate_loss
from lmforge.faults import fault
from lmforge.infer.generate import complete
from lmforge.models import build_model, model_config
from lmforge.ops.cross_entropy import cross_entropy
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
from lmforge.parallel.tensor import reduce_partial_grads
from lmforge.runtime import (
    autocast,
    configure_backends,
    peak_flops,
    resolve_device,
    resolve_precision,
    synchronize,
)
from lmforge.train.activation_checkpointing import apply_activation_checkpointing
from lmforge.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    recover_interrupted_save,
    save_checkpoint,
    verify_checkpoint,
)
from lmforge.train.compile import apply_compile
from lmforge.train.converters import convert_model
from lmforge.train.float8 import check_float8_device
from lmforge.train.guards import (
    NonFiniteGuard,
    StopSignal,
    skip_on_device,
    step_flags,
    supports_skip_on_device,
)
from lmforge.train.metrics import BatchLog, MetricsLogger
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
    overrides = {"qk_norm": True} if cfg.qk_norm else {}  # ModelConfig allows it for llama only
    try:
        return model_config(cfg.family, cfg.flavor, vocab_size=vocab_size, max_seq_len=seq_len, **overrides)
    except ValueError as err:
        raise ConfigError(f"config key 'model': {err}") from None


# Keys of the data section that change how fast data is read, not which tokens are trained on.
DATA_SPEED_KEYS = ("num_workers", "loader_workers")


def check_resume_compatible(saved: RunConfig, cfg: RunConfig, run_dir: Path) -> None:
    """A resumed run may change how long it trains, not what it trains."""
    for section in ("model", "data"):
        old, new = to_dict(saved)[section], to_dict(cfg)[section]
        if section == "data":
            old, new = ({k: v for k, v in d.items() if k not in DATA_SPEED_KEYS} for d in (old, new))
        if old != new:
            raise ConfigError(
                f"cannot resume {run_dir}: config section '{section}' differs from the run's config.yaml "
                f"({old} vs {new})"
            )


def _on_rank0(fn, *args):
    """Run fn on rank 0 only (file writes, data preparation, checksums) and give every rank its
    result; the others wait, and raise its error too."""
    if not dist.is_initialized():
        return fn(*args)
    outcome: list = [None, None]  # [error, result]
    failure = None
    if dist.get_rank() == 0:
        try:
            outcome[1] = fn(*args)
        except LmforgeError as err:
            outcome[0] = str(err)
        except Exception as err:  # a bug or an OSError: the others must not wait for the timeout
            failure = err
            outcome[0] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise LmforgeError(outcome[0] if dist.get_rank() == 0 else f"rank 0 failed: {outcome[0]}")
    return outcome[1]


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


def _check_every(
    cfg: RunConfig, optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler
) -> int:
    """train.check_every, resolved: steps between host reads of the non-finite and stop flags."""
    can_defer = all(supports_skip_on_device(o) for o in optimizers) and not scaler.is_enabled()
    if cfg.train.check_every is None:
        # At most 10: a stop signal is acted on at the next read, within a scheduler's grace period.
        return min(cfg.logging.log_every, 10) if can_defer else 1
    if cfg.train.check_every > 1 and not can_defer:
        raise ConfigError(
            f"config key 'train.check_every' is {cfg.train.check_every}, but skipping a non-finite step "
            f"without a host sync needs a fused Adam/AdamW (optim.name adamw or adam, optim.fused true) "
            f"and no fp16 GradScaler; got optim.name {cfg.optim.name!r}, optim.fused {cfg.optim.fused}"
        )
    return cfg.train.check_every


def _peer_failure(err: BaseException) -> bool:
    """A collective that timed out or lost a peer (rather than a bug on this rank)."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(
        word in text
        for word in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")
    )


def _first_sentence(err: BaseException) -> str:
    """'Connection closed by peer [127.0.0.1]:4505' of a gloo/NCCL error, without its source location."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(err).strip().splitlines()[0])
    return text.split(". ")[0].rstrip(".")


def _restart_count() -> int:
    """How many times torchrun restarted this job (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _checkpoint_to_resume(run_dir: Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint a run starts from, decided on rank 0 (which alone reads every checksum).

    resume=True: the newest valid checkpoint (older ones are tried with a warning naming the bad
    file); a path: exactly that checkpoint, or an error. A job torchrun restarted after a failure
    resumes by itself when its own first attempt started the run and left checkpoints. Never
    silently from scratch.
    """
    root = run_dir / "checkpoints"
    if root.is_dir():
        recover_interrupted_save(root)
    if resume not in (True, False):
        ckpt_dir = Path(resume)
        verify_checkpoint(ckpt_dir)
        return ckpt_dir
    if resume:
        if not run_dir.is_dir():
            raise CheckpointError(f"cannot resume: run directory {run_dir} does not exist")
        return latest_checkpoint(run_dir)
    if list_checkpoints(run_dir):
        if _restart_count() > 0 and _started_by_this_job(run_dir):
            return latest_checkpoint(run_dir)
        raise CheckpointError(
            f"run directory {run_dir} already has checkpoints: pass --resume, or choose another --out"
        )
    return None


JOB_MARKER = ".torchrun_job"  # RUN/.torchrun_job: the torchrun job (TORCHELASTIC_RUN_ID) that started the run


def _started_by_this_job(run_dir: Path) -> bool:
    """A restarted attempt resumes by itself only a run its own job's first attempt started (not one
    that attempt refused to overwrite)."""
    marker = run_dir / JOB_MARKER
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    return job is not None and marker.is_file() and marker.read_text() == job


def _check_start(run_dir: Path, cfg: RunConfig, resume: bool | str | Path) -> Path | None:
    ckpt_dir = _on_rank0(_checkpoint_to_resume, run_dir, resume)
    if ckpt_dir is not None:
        check_resume_compatible(load_config(ckpt_dir / "config.yaml"), cfg, run_dir)
    return ckpt_dir


def _build_converted(model_cfg, cfg: RunConfig, dims: ParallelDims, build_on, device: torch.device):
    """build_model on `build_on` (the device or "meta"), then the module swaps of `train`."""
    model = build_model(model_cfg, build_on)
    convert_model(model, cfg.train, dims.tp, device)
    return model


def _build_parallel_model(model_cfg, cfg: RunConfig, dims: ParallelDims, mesh, device: torch.device, dtype):
    """(model, the module the step calls). Sharded layouts of big models are built on the meta
    device and only this rank's shards are ever allocated; otherwise every rank builds the full
    model from the same seed, which is exactly the single-process initialisation."""
    if not dims.distributed:
        model = _build_converted(model_cfg, cfg, dims, device, device)
        return model, model
    sharded = dims.dp_shard > 1 or dims.tp > 1
    meta_init = cfg.parallel.meta_init
    if meta_init is None:
        meta_init = sharded and build_model(model_cfg, "meta").num_params() >= 1_000_000_000
    if not (meta_init and sharded):
        model = _build_converted(model_cfg, cfg, dims, device, device)
        return model, parallelize(model, dims, mesh, cfg.parallel, device, dtype)
    model = _build_converted(model_cfg, cfg, dims, "meta", device)
    step_module = parallelize(model, dims, mesh, cfg.parallel, device, dtype)
    model.to_empty(device=device)
    model.init_weights()
    return model, step_module


def pretrain(cfg: RunConfig, out: str | Path, resume: bool | str | Path = False) -> dict:
    """Train and return the last evaluation ({"step", "val_loss", "val_ppl"}), or
    {"step", "stopped_by"} when SIGTERM/SIGINT ended the run after a checkpoint.

    resume: True continues from the run's newest valid checkpoint, a checkpoint directory from
    exactly that one. Under torchrun every process calls this; the layout comes from `cfg.parallel`.
    """
    run_dir = Path(out)
    world_size = world_size_from_env()
    dims = resolve_dims(cfg.parallel, world_size)
    device = local_device(resolve_device(cfg.train.device))
    if dims.distributed:
        init_distributed(device, cfg.parallel.timeout_s)
    try:
        with StopSignal() as stop_signal:
            result = _pretrain(cfg, run_dir, resume, dims, device, stop_signal)
        if dims.distributed:
            dist.barrier()  # no rank tears its process group down while another still talks to it
        return result
    except RuntimeError as err:  # gloo/NCCL errors are RuntimeErrors (DistBackendError among them)
        if dims.distributed and _peer_failure(err):
            raise LmforgeError(
                f"rank {dist.get_rank()}: a collective failed ({_first_sentence(err)}): another rank died "
                f"or stopped answering for parallel.timeout_s={cfg.parallel.timeout_s}s"
            ) from err
        raise
    finally:
        if dist.is_initialized():
            # Destroy the process groups while the interpreter is fully alive: collect the reference
            # cycles that still hold one (DDP's reducer, the device mesh) now, not at interpreter
            # teardown, where a gloo worker thread releasing a tensor needs a GIL that is gone and the
            # process aborts ("terminate called without an active exception", seen once in CI).
            gc.collect()
            dist.destroy_process_group()
            gc.collect()


def _pretrain(cfg: RunConfig, run_dir: Path, resume: bool | str | Path, dims: ParallelDims, device: torch.device,
              stop_signal: StopSignal) -> dict:  # fmt: skip
    rank = dist.get_rank() if dist.is_initialized() else 0
    ckpt_dir = _check_start(run_dir, cfg, resume)
    if cfg.train.float8:  # before any data is prepared
        check_float8_device(device)
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
        if "TORCHELASTIC_RUN_ID" in os.environ and _restart_count() == 0:
            (run_dir / JOB_MARKER).write_text(os.environ["TORCHELASTIC_RUN_ID"])
        ensure_data(cfg.data, run_dir, cfg.train.seed)
        if tokenizer_path.resolve() != (data_dir / "tokenizer.json").resolve():
            shutil.copyfile(data_dir / "tokenizer.json", tokenizer_path)

    _on_rank0(prepare_run_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    model_cfg = run_model_config(cfg.model, seq_len, tokenizer.get_vocab_size())
    if dims.distributed:
        validate_layout(model_cfg, dims, cfg.parallel, seq_len, micro_batch * accum_steps)
    if cfg.optim.name == "muon" and (dims.dp_shard > 1 or dims.tp > 1):
        raise ConfigError(
            "parallel layout: optim.name 'muon' orthogonalises whole matrices, which FSDP and TP shard "
            f"(parallel.dp_shard={dims.dp_shard}, parallel.tp={dims.tp}): use parallel.dp_replicate or parallel.pp"
        )
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and in every layout
    pipe = None
    if dims.pp > 1 and dtype == torch.float16:
        raise ConfigError(
            "parallel.pp > 1 does not support train.precision fp16 (no GradScaler in the pipeline): use bf16"
        )
    if dims.pp > 1:
        # The full model is built (same seed everywhere) and pruned to this rank's stages, which
        # then get TP/FSDP like a whole model would.
        model = _build_converted(model_cfg, cfg, dims, device, device)
        pipe = PipelineStep(model, cfg, mesh["pp"], device, cfg.parallel.pp_microbatches or dims.pp,
                            lambda part: parallelize(part, dims, mesh, cfg.parallel, device, dtype))  # fmt: skip
        parts, optimizers = pipe.parts, pipe.optimizers
        step_module = None
    else:
        model, step_module = _build_parallel_model(model_cfg, cfg, dims, mesh, device, dtype)
        parts, optimizers = [model], [build_optimizer(model, cfg.optim, device.type)]

    for part in parts:  # after TP/FSDP, before compile
        apply_activation_checkpointing(part, cfg.train.activation_checkpointing)
    dp_rank_index = dp_rank(mesh, dims) if mesh is not None else 0
    loader = BatchLoader(data_dir, "train", micro_batch, seq_len, cfg.train.seed, dp_rank_index, dims.dp,
                         pin_memory=device.type == "cuda", num_workers=cfg.data.loader_workers)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = 0
    guard = NonFiniteGuard(cfg.train)
    if ckpt_dir is not None:
        state = load_checkpoint(ckpt_dir, parts, optimizers)
        step = state["step"]
        loader.load_state_dict(state["loader"])
        guard.load_state_dict(state.get("guard", {}))
        if state.get("grad_scaler"):  # fp16: the loss scale continues where it was
            scaler.load_state_dict(state["grad_scaler"])
        if rank == 0:
            print(f"resuming from {ckpt_dir} (step {step})", flush=True)
    batch_log = BatchLog(run_dir, rank, step, enabled=cfg.logging.batch_hashes)
    _on_rank0(save_config, cfg, run_dir / "config.yaml")

    fused_loss = cfg.train.fused_loss if cfg.train.fused_loss is not None else dims.tp == 1 and dims.pp == 1
    if fused_loss and (dims.tp > 1 or dims.pp > 1):
        raise ConfigError(
            "config key 'train.fused_loss' needs the whole output head: not with parallel.tp or pp > 1"
        )
    use_compile = cfg.train.compile if cfg.train.compile is not None else device.type == "cuda"
    use_compile = use_compile and pipe is None  # pipeline stages run eagerly for now
    if use_compile and cfg.train.compile_mode in ("reduce-overhead", "max-autotune") and dims.distributed:
        # CUDA graphs replay fixed memory addresses and kernels; the gradient reduction and FSDP's
        # per-step all-gathers between them are not captured correctly by them yet.
        raise ConfigError(
            f"config key 'train.compile_mode' {cfg.train.compile_mode!r} records CUDA graphs, which are not "
            f"supported with several processes (layout {dims}) yet: use 'default' or 'max-autotune-no-cudagraphs'"
        )
    train_model = (
        apply_compile(step_module, model, cfg.train.compile_scope, cfg.train.compile_mode)
        if use_compile
        else step_module
    )
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
        f"{global_tokens:,} tokens/step ({accum_steps} micro-batches per rank), fused_loss={fused_loss}, "
        f"run directory {run_dir}"
    )

    def evaluate(at_step: int) -> dict:
        train_clock = time.perf_counter() - started - paused_s
        # Every rank evaluates the same batches (FSDP needs all ranks in each forward).
        if pipe is not None:
            val_loss = pipe.evaluate(val_data, device)
            record = {"step": at_step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
        else:
            record = {"step": at_step, **evaluate_loss(model, val_data, device, dtype)}
            record.pop("val_tokens")
        # Seconds this process spent training before this evaluation (evaluations and checkpoints
        # left out): the clock of time-to-loss comparisons.
        record["train_time_s"] = train_clock
        log.log_eval(record)
        if cfg.train.sample_tokens > 0 and dims.tp == 1 and pipe is None:
            # Eagerly: generation's changing shapes and KV caches would make compiled blocks
            # recompile until Dynamo gives up on them, for training too.
            with torch.compiler.set_stance("force_eager"):
                text = complete(
                    model, tokenizer, "def ", cfg.train.sample_tokens, temperature=0.8, top_k=50, seed=at_step
                )
            log.print(f"sample: def {text!r}")
        return record

    def checkpoint(at_step: int) -> None:
        if not cfg.checkpoint.enabled:
            return
        trainer_state = {
            "loader": loader.state_dict(),
            "guard": guard.state_dict(),
            "grad_scaler": scaler.state_dict(),
        }
        save_checkpoint(run_dir, at_step, parts, optimizers, trainer_state, cfg, tokenizer_path,
                        cfg.checkpoint.keep_last)  # fmt: skip

    def rollback() -> int:
        """Reload the last checkpoint's model and optimizer (not its data position); its step."""
        ckpt = _on_rank0(latest_checkpoint, run_dir) if list_checkpoints(run_dir) else None
        if ckpt is None:
            raise LmforgeError("training stopped: non-finite steps and no checkpoint to roll back to")
        restored = load_checkpoint(ckpt, parts, optimizers)["step"]
        log.event({"step": step, "event": "rollback", "to_step": restored, "lr_scale": guard.lr_scale})
        log.print(f"step {step}: {cfg.train.nonfinite_patience} non-finite steps in a row, rolled back to "
                  f"{ckpt.name} with the learning rate scaled by {guard.lr_scale:g}")  # fmt: skip
        return restored

    def read_flags(at_step: int) -> tuple[bool, bool, bool]:
        """Read the flags of the steps since the last read (a host sync) and let the guard count
        them: (the last step non-finite, a stop requested, roll back). Raises when the guard says stop."""
        rows = torch.stack(pending).tolist()
        pending.clear()
        for index, (bad_flag, _) in enumerate(rows):
            bad_at = at_step - len(rows) + 1 + index
            action = guard.record(bad_at, bad_flag > 0)
            if action is not None:
                log.event(
                    {"step": bad_at, "event": "nonfinite", "action": action, "nonfinite_steps": guard.total}
                )
            if action == "rollback":  # the steps after it are undone by the rollback
                return True, False, True
        return rows[-1][0] > 0, any(stop_flag > 0 for _, stop_flag in rows), False

    check_every = _check_every(cfg, optimizers, scaler)
    pending: list[torch.Tensor] = []  # step_flags of the steps not read on the host yet
    last_eval: dict = {}
    started = last_log_time = time.perf_counter()
    paused_s = 0.0  # time spent evaluating and checkpointing
    last_log_step = step
    while step < max_steps:
        bad = stop = roll_back = False  # known for this step once its flags are read (below)
        lr = lr_at(step, cfg.schedule, cfg.optim.lr, total_steps) * guard.lr_scale
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        if pipe is not None:
            # The schedule splits this rank's accum_steps micro-batches into pipeline micro-batches.
            batches = [batch_log.record(step + 1, loader.next_batch()) for _ in range(accum_steps)]
            inputs, targets = (torch.cat(t).to(device, non_blocking=True) for t in zip(*batches, strict=True))
            with autocast(device, dtype):
                loss_sum, grad_norm = pipe.train_step(inputs, targets, max_norm)
        else:
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(accum_steps):
                batch = batch_log.record(step + 1, loader.next_batch())
                inputs, targets = (t.to(device, non_blocking=True) for t in batch)
                with gradient_sync(step_module, enabled=micro_step == accum_steps - 1):
                    with autocast(device, dtype):
                        if fused_loss:  # the model returns the loss; no (B, T, V) logits
                            loss = train_model(inputs, targets=targets) / accum_steps
                        else:
                            loss = cross_entropy(train_model(inputs), targets) / accum_steps
                    if fault("train.loss", step + 1):
                        loss = loss * float("nan")
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if dims.tp > 1:
                reduce_partial_grads(model.parameters())  # sequence-parallel norms' gradients
            scaler.unscale_(optimizers[0])
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if fault("train.loss_value", step + 1):
            loss_sum = loss_sum * float("nan")
        grad_norm = _full(grad_norm)  # once per step: the non-finite check and the logging read it
        # With fp16 the GradScaler skips overflowing steps itself; a non-finite loss is ours to handle.
        flags = step_flags(loss_sum, grad_norm, stop_signal.requested is not None, not scaler.is_enabled())
        if check_every == 1:  # decide on the host: one sync per step
            pending.append(flags)
            bad, stop, roll_back = read_flags(step + 1)
            if bad:  # skip the update: parameters and optimizer state stay as they were
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled():
                    scaler.update()
            else:
                for optimizer in optimizers:
                    scaler.step(optimizer)
                    optimizer.zero_grad(set_to_none=True)
                scaler.update()
        else:  # the fused optimizer skips a non-finite step on the device; the host reads the flags later
            skip_on_device(optimizers, flags)
            pending.append(flags)
        step += 1
        log.advance()
        fault("train.step", step)
        logging_step = step % cfg.logging.log_every == 0 or step == max_steps
        eval_step = cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != max_steps
        periodic = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if check_every > 1 and (step % check_every == 0 or logging_step or eval_step or periodic):
            bad, stop, roll_back = read_flags(step)
        if roll_back:
            step = last_log_step = rollback()
            continue

        if not bad and logging_step:
            # Host syncs: the flags above (every train.check_every steps), .item() on logging steps.
            loss_value, grad_norm_value = _global_mean(loss_sum).item(), grad_norm.item()
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
                "nonfinite_steps": guard.total,
            })  # fmt: skip
            last_log_time, last_log_step = now, step
        paused_at = time.perf_counter()  # evaluation and checkpoints do not count towards tokens/s
        if eval_step and not stop:
            last_eval = evaluate(step)
            target = cfg.train.target_val_loss
            if target is not None and last_eval["val_loss"] <= target:
                log.event({"step": step, "event": "target_reached", "val_loss": last_eval["val_loss"],
                           "target_val_loss": target, "train_time_s": last_eval["train_time_s"]})  # fmt: skip
                log.print(
                    f"step {step}: validation loss {last_eval['val_loss']:.4f} <= train.target_val_loss {target}"
                )
                max_steps = step  # the end-of-run checkpoint follows; the evaluation is not repeated
        if step != max_steps and (periodic or stop):
            checkpoint(step)
        if stop and step != max_steps:  # preempted: the checkpoint is written, exit cleanly
            outcome = (
                f"checkpoint written at step {step}, stopping; continue with --resume"
                if cfg.checkpoint.enabled
                else f"stopping at step {step} (checkpoint.enabled=false: nothing to resume from)"
            )
            log.print(f"{stop_signal.requested or 'another rank'}: {outcome}")
            log.close()
            batch_log.close()
            loader.close()
            return {"step": step, "stopped_by": stop_signal.requested or "another rank's signal"}
        last_log_time += time.perf_counter() - paused_at
        paused_s += time.perf_counter() - paused_at

    last_eval = evaluate(step) if not last_eval or last_eval["step"] != step else last_eval
    checkpoint(step)
    log.close()
    batch_log.close()
    loader.close()
    return last_eval
