"""The figures of pruning's targets: perplexity after pruning, with and without the recovery
fine-tune, on a trained model; evaluation speed of the structurally pruned 124m shape.

    python benchmarks/prune_bench.py --run runs/quickstart --out runs/prune-bench [--skip-speed]
    python benchmarks/prune_bench.py --skip-quality --rounds 5          # speed only

Quality: the run (the quickstart's tiny llama, recipes/tiny.yaml) is pruned with the real command,
`lmforge compress prune`, in a fresh process per variant, and every model is evaluated by
`lmforge eval` on the run's validation split (its default: 50 batches of 8 x 256, the run's
precision). Variants: magnitude 50% (global and per layer) without recovery and with 200 recovery
steps (its zeros kept); heads-channels 25% (a quarter of the kv groups and of the MLP channels)
without recovery and with 300 recovery steps (plain, and distilled from the unpruned model with
--distill); 2:4 without and with 200 steps. And a control: the unpruned model fine-tuned by the same
recipe for 200 and 300 steps (the tiny run is short of converged: more training alone lowers its
perplexity, so a recovered model is also compared with that). Targets: magnitude 50% + <= 200 steps within +5% of
the unpruned perplexity; heads-channels 25% + <= 300 steps within +10%.

Speed: the llama 124m shape with random weights (speed does not depend on them), its heads and
channels pruned by 25% through prune_heads_channels (one random calibration batch), against the
unpruned shape: tokens/s of a batched forward (the logits of 4 x 256 tokens, as `lmforge eval`
computes them), fp32, 2 threads, eager, rounds alternated so that drift in the machine's load hits
both alike (--bf16: also under bf16 autocast, what precision auto computes in on a CPU with native
bf16). At the flavor's vocabulary (50304) and at our tokenizer's (8192): the output head, which
pruning leaves whole, is a third of the 124m model's matmuls at 50304. Target: >= 1.25x.
With CUDA: also 2:4 (torchao's semi-structured sparse weights) against dense, fp16, on the GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.compress.prune import prune_heads_channels, recovery_config
from lmforge.config import save_config
from lmforge.models import build_model, model_config
from lmforge.rundir import data_dir_for, resolve_checkpoint
from lmforge.runtime import autocast

VARIANTS = {  # name -> the arguments of `lmforge compress prune` after RUN
    "magnitude-50-global": ["--method", "magnitude", "--sparsity", "0.5", "--scope", "global"],
    "magnitude-50-layer": ["--method", "magnitude", "--sparsity", "0.5", "--scope", "layer"],
    "magnitude-50-global+200": ["--method", "magnitude", "--sparsity", "0.5", "--recover-steps", "200"],
    "heads-channels-25": ["--method", "heads-channels", "--sparsity", "0.25"],
    "heads-channels-25+300": ["--method", "heads-channels", "--sparsity", "0.25", "--recover-steps", "300"],
    "2:4": ["--method", "2:4"],
    "2:4+200": ["--method", "2:4", "--recover-steps", "200"],
}
DISTILLED = {"heads-channels-25+300-distilled": [*VARIANTS["heads-channels-25+300"], "--recover-distill"]}
CONTROLS = {"unpruned+200": 200, "unpruned+300": 300}  # the unpruned model, fine-tuned as a recovery is
TARGETS = {
    "magnitude-50-global+200": 1.05,
    "heads-channels-25+300": 1.10,
    "heads-channels-25+300-distilled": 1.10,
}


def lmforge(*args: str) -> dict:
    """Run the CLI in a fresh process; its last line of output (JSON)."""
    done = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lmforge {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def control(run: str, target: Path, steps: int) -> None:
    """The unpruned model fine-tuned exactly as a recovery fine-tune of `steps` steps trains a pruned one
    (recovery_config): the tiny run is short of converged, so any further training lowers its
    perplexity, and a recovered model is fairly compared with this, not only with the run itself."""
    source = resolve_checkpoint(run)
    cfg = recovery_config(source, source, steps, distill=False)
    cfg = replace(cfg, data=replace(cfg.data, dir=str(data_dir_for(cfg.data, Path(run)).resolve())))
    config = target.parent / f"{target.name}.yaml"
    save_config(cfg, config)
    lmforge("pretrain", "--config", str(config), "--out", str(target), "--resume", "auto")


def quality(run: str, out: Path, variants: dict[str, list[str]]) -> None:
    baseline = lmforge("eval", run)["val_ppl"]
    print(json.dumps({"variant": "unpruned", "val_ppl": baseline}), flush=True)
    rows: dict[str, tuple[float, float]] = {}
    for name, args in variants.items():
        target = out / name.replace(":", "_").replace("+", "_plus_")
        started = time.perf_counter()
        if name in CONTROLS:
            control(run, target, CONTROLS[name])
        elif not (target / "checkpoints").is_dir() or "--recover-steps" in args:  # a rerun resumes a recovery
            lmforge("compress", "prune", run, *args, "--out", str(target))
        seconds = time.perf_counter() - started
        ppl = lmforge("eval", str(target))["val_ppl"]
        rows[name] = (ppl, seconds)
        print(json.dumps({"variant": name, "val_ppl": ppl, "vs_unpruned": ppl / baseline, "seconds": seconds}),
              flush=True)  # fmt: skip
    print(f"\nunpruned {run}: val_ppl {baseline:.3f} (lmforge eval: validation split)\n")
    print("| variant | val_ppl | vs unpruned | vs unpruned fine-tuned alike | target | time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (ppl, seconds) in rows.items():
        steps = name.split("+")[1].split("-")[0] if "+" in name else None
        alike = rows.get(f"unpruned+{steps}") if steps and not name.startswith("unpruned") else None
        versus = f"{ppl / alike[0]:.3f}x" if alike else ""
        ratio = ppl / baseline
        target = (
            f"<= {TARGETS[name]:.2f}x: {'met' if ratio <= TARGETS[name] else 'missed'}"
            if name in TARGETS
            else ""
        )
        print(f"| {name} | {ppl:.3f} | {ratio:.3f}x | {versus} | {target} | {seconds:.0f} s |")


@torch.no_grad()
def tokens_per_s(model: torch.nn.Module, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    started = time.perf_counter()
    with torch.no_grad(), autocast(idx.device, dtype):
        model(idx)  # the logits, as lmforge eval computes them
    return idx.numel() / (time.perf_counter() - started)


def speed(rounds: int, vocab_size: int, dtype: torch.dtype = torch.float32) -> dict:
    torch.manual_seed(0)
    cfg = model_config("llama", "124m", vocab_size=vocab_size, max_seq_len=256)
    whole = build_model(cfg).eval()
    pruned = prune_heads_channels(whole, [torch.randint(0, vocab_size, (1, 64))], 0.25).eval()
    idx = torch.randint(0, vocab_size, (4, 256))
    results: dict[str, list[float]] = {"unpruned": [], "pruned": []}
    for model in (whole, pruned):  # warm-up: allocator, first-call overheads
        tokens_per_s(model, idx, dtype)
    for _ in range(rounds):  # alternated
        results["unpruned"].append(tokens_per_s(whole, idx, dtype))
        results["pruned"].append(tokens_per_s(pruned, idx, dtype))
    speedups = [p / u for u, p in zip(results["unpruned"], results["pruned"], strict=True)]
    return {
        "vocab_size": vocab_size,
        "compute": str(dtype).removeprefix("torch."),
        "shape": {"n_heads": pruned.cfg.n_heads, "n_kv_heads": pruned.cfg.n_kv_heads, "ffn_hidden": pruned.cfg.ffn_hidden},
        "params": {"unpruned": whole.num_params(), "pruned": pruned.num_params()},
        "matmul_ratio": _matmul_params(whole) / _matmul_params(pruned),
        "tokens_per_s": {name: statistics.median(values) for name, values in results.items()},
        "speedup_median": statistics.median(speedups),
        "speedup_range": [min(speedups), max(speedups)],
    }  # fmt: skip


def _matmul_params(model: torch.nn.Module) -> int:
    """Weights that a forward multiplies (every linear layer: the blocks' and the output head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def gpu_2_4(rounds: int) -> dict | None:
    """2:4 sparse weights (torchao, cuSPARSELt/CUTLASS kernels) against dense on the GPU, fp16, the
    124m shape's batched forward; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torchao.sparsity import semi_sparse_weight, sparsify_

    from lmforge.compress.prune import block_linears, prune_2_4

    torch.manual_seed(0)
    cfg = model_config("llama", "124m", max_seq_len=256)
    dense = build_model(cfg, "cuda").half().eval()
    sparse = build_model(cfg, "cuda").half().eval()
    sparse.load_state_dict(dense.state_dict())
    prune_2_4(sparse)
    linears = block_linears(sparse)
    sparsify_(sparse, semi_sparse_weight(), filter_fn=lambda module, name: name in linears)
    idx = torch.randint(0, cfg.vocab_size, (16, 256), device="cuda")

    @torch.no_grad()
    def timed(model: torch.nn.Module) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            model(idx)
        torch.cuda.synchronize()
        return 10 * idx.numel() / (time.perf_counter() - started)

    results: dict[str, list[float]] = {"dense": [], "2:4": []}
    timed(dense), timed(sparse)
    for _ in range(rounds):
        results["dense"].append(timed(dense))
        results["2:4"].append(timed(sparse))
    medians = {name: statistics.median(values) for name, values in results.items()}
    return {
        "gpu": torch.cuda.get_device_name(),
        "tokens_per_s": medians,
        "speedup": medians["2:4"] / medians["dense"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", default="runs/quickstart", help="a trained tiny llama run (the quickstart's)"
    )
    parser.add_argument("--out", default="runs/prune-bench", help="where the pruned runs go")
    parser.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--distill", action="store_true", help="also the distilled heads-channels recovery")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--bf16", action="store_true", help="speed also under bf16 autocast (precision auto here)"
    )
    args = parser.parse_args()
    if not args.skip_speed:
        torch.set_num_threads(args.threads)
        for vocab_size in (50304, 8192):
            for dtype in [torch.float32, torch.bfloat16][: 2 if args.bf16 else 1]:
                result = speed(args.rounds, vocab_size, dtype)
                print(json.dumps(result), flush=True)
                print(f"124m shape, vocab {vocab_size}: pruned {result['tokens_per_s']['pruned']:.0f} tokens/s, "
                      f"unpruned {result['tokens_per_s']['unpruned']:.0f}: {result['speedup_median']:.3f}x "
                      f"(range {result['speedup_range'][0]:.3f}-{result['speedup_range'][1]:.3f}; matmul weights "
                      f"{result['matmul_ratio']:.3f}x fewer), CPU, {args.threads} threads, {result['compute']}, "
                      f"4 x 256, {args.rounds} rounds alternated, torch {torch.__version__}", flush=True)  # fmt: skip
        gpu = gpu_2_4(args.rounds)
        print(json.dumps(gpu) if gpu else "2:4 on GPU: skipped, no CUDA here", flush=True)
    if not args.skip_quality:
        variants = {**VARIANTS, **(DISTILLED if args.distill else {}), **{name: [] for name in CONTROLS}}
        if args.variants:
            variants = {name: variants[name] for name in args.variants.split(",")}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        quality(args.run, Path(args.out), variants)


if __name__ == "__main__":
    main()
