"""Generation speed on this CPU: lmforge (eager, compiled decode step) beside Hugging Face transformers.

    python benchmarks/generate_bench.py [--flavors tiny,124m] [--rounds 3] [--threads 2] [--speculative]

For each llama flavor: random weights (seed 0), fp32, a 32-token prompt, 128 new tokens, greedy.
- batch 1: lmforge's `generate` eager, the same with `compile=True` (torch.compile of the decode step,
  compiled once before timing: its compile time is printed apart), and transformers'
  `LlamaForCausalLM.generate` on the same weights (built from the family's own Hugging Face map,
  lmforge.models.llama.hf), timed in turn, round after round, so a change in the machine's load hits
  all of them alike; tokens/s (new tokens over the wall time, prefill included): median (min-max).
- batch 8: eight 32-token prompts at once (`generate_batch`; transformers' `generate` on the batch).
- llama.cpp, when `llama_cpp` imports and lmforge.gguf exists: the same weights exported to GGUF (f32).
- `--precisions fp32,bf16,int8` (batch 1): bf16 is lmforge and transformers with bf16 weights and
  llama.cpp's bf16 export; int8 is lmforge's int8-weight quantization (`lmforge compress quantize
  --scheme int8-weight`: torchao's int8 weights per channel, computed in bf16 by PyTorch's int8-weight
  kernel) beside llama.cpp's q8_0 export (int8 blocks of 32 with an fp16 scale each). Their bandwidth
  bounds count the bytes each reads (bf16: 2 per weight, int8: 1, q8_0: 34 per 32).
- with --speculative: lmforge's speculative decoding (k = 4) with a layer-skip draft (the target's
  first layer, sharing its embeddings and head): the acceptance rate and the speed-up over plain
  greedy, at three agreements set by construction (see bench_speculative). With random weights the
  acceptance rate is a property of the models built, not of the code: what it shows is the speed-up
  each acceptance rate buys on this machine.

Every figure is also given as a fraction of the memory-bandwidth bound: a decode step reads every
weight once (the embedding table only one row), so tokens/s cannot exceed (measured bandwidth) /
(weight bytes per step) x (tokens per step); the bandwidth is that of a plain torch sum over a buffer
of the weights' size (so a model that fits in the CPU's cache is measured against the cache's speed).
Speculative decoding reads the target's weights once per verified block of tokens, so it can pass
that bound. The greedy tokens of every implementation are compared too (`same_tokens`). Needs
transformers.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.infer.generate import SamplingParams, generate, generate_batch
from lmforge.infer.speculative import SpeculativeStats, speculative_generate
from lmforge.models import FamilyModel, build_model, model_config, spec_of
from lmforge.rundir import model_state_dict


def plain_sum_bandwidth(n_bytes: int, repeats: int = 20) -> float:
    """Bytes/s of torch's sum over an fp32 buffer of n_bytes: the best of `repeats`."""
    buffer = torch.rand(max(n_bytes // 4, 1024))
    buffer.sum()  # touch it once
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best


def weight_bytes_per_step(model: FamilyModel) -> int:
    """Bytes of weights one decode step reads: all of them, but one row of an untied embedding table."""
    n = model.num_params()
    if not model.cfg.tie_embeddings:
        n -= model.tok_embeddings.weight.numel() - model.cfg.dim
    return 4 * n


def hf_model(model: FamilyModel):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_map = spec_of(model).hf
    assert hf_map is not None
    config = LlamaConfig(**hf_map.config_to_hf(model.cfg), attn_implementation="sdpa")
    theirs = LlamaForCausalLM(config).eval()
    missing, unexpected = theirs.load_state_dict(
        hf_map.state_to_hf(model_state_dict(model), model.cfg), strict=False
    )
    assert not unexpected and all("lm_head" in name for name in missing), (missing, unexpected)
    return theirs


def hf_generate(theirs, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts)  # (B, T): prompts of one length, no padding
    with torch.no_grad():
        out = theirs.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[:, ids.size(1) :].tolist()


def llama_cpp_runner(
    model: FamilyModel, workdir: Path, threads: int, outtype: str = "f32"
) -> Callable[[list[int], int], list[int]] | None:
    """A greedy generator on llama.cpp of the same weights, or None without llama_cpp / lmforge.gguf.

    The weights go lmforge -> Hugging Face directory -> `lmforge import` -> `lmforge export --format
    gguf`, the path a user takes; the tokenizer (trained on a few lines here) only fills the vocabulary.
    """
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("lmforge.gguf") is None:
        return None
    import llama_cpp

    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.gguf import export_gguf
    from lmforge.hf import import_hf
    from lmforge.rundir import latest_checkpoint

    hf_dir = workdir / "hf"
    if not (workdir / "run").exists():
        hf_model(model).save_pretrained(hf_dir)
        tokenizer = train_tokenizer([Path(__file__).read_text()], vocab_size=min(model.cfg.vocab_size, 1024))
        tokenizer.save(str(hf_dir / "tokenizer.json"))
        import_hf(hf_dir, workdir / "run")
    gguf_path = export_gguf(latest_checkpoint(workdir / "run"), workdir / f"model-{outtype}.gguf", outtype)
    params = llama_cpp.llama_model_default_params()
    # llama.cpp's extra weight buffers off: its AMX q8_0 kernels (llama-cpp-python 0.3.36) crash on
    # this CPU (see tests/hf/test_gguf.py); f32 and bf16 do not use them.
    extra = {"use_extra_bufts": False} if outtype == "q8_0" and hasattr(params, "use_extra_bufts") else {}
    if extra:
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        llm = llama_cpp.Llama(
            model_path=str(gguf_path),
            n_ctx=model.cfg.max_seq_len,
            n_threads=threads,
            n_batch=64,
            verbose=False,
        )
    finally:
        if extra:
            llama_cpp.llama_cpp.llama_model_default_params = defaults

    def run(prompt: list[int], new_tokens: int) -> list[int]:
        llm.reset()
        tokens = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
        return tokens

    return run


def timed(function: Callable[[], list]) -> tuple[float, list]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def cpu_timed(function: Callable[[], list]) -> tuple[float, float, list]:
    """Wall seconds, this process's CPU seconds (all threads), result. On a shared machine the CPU
    time moves less with the other processes' load than the wall time does."""
    started, cpu_started = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - started, time.process_time() - cpu_started, result


def summary(tokens_per_sec: list[float], bound: float, cpu_ms_per_token: list[float] | None = None) -> dict:
    median = statistics.median(tokens_per_sec)
    out = {
        "tokens_per_sec": round(median, 1),
        "spread": [round(min(tokens_per_sec), 1), round(max(tokens_per_sec), 1)],
        "of_bandwidth_bound": round(median / bound, 3),
    }
    if cpu_ms_per_token:
        out["cpu_ms_per_token"] = round(statistics.median(cpu_ms_per_token), 2)
    return out


def bench_flavor(flavor: str, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(model_config("llama", flavor)).eval()
    vocab = model.cfg.vocab_size
    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, vocab, (args.prompt_len,), generator=generator).tolist() for _ in range(args.batch)
    ]
    n = args.new_tokens
    greedy = SamplingParams(max_new_tokens=n, temperature=0)
    weight_bytes = weight_bytes_per_step(model)
    bandwidth = plain_sum_bandwidth(weight_bytes)
    bound = bandwidth / weight_bytes  # decode steps/s if only the weights' reads cost time
    head = {"flavor": flavor, "params": model.num_params(), "weight_mb_per_step": round(weight_bytes / 2**20, 1),
            "plain_sum_gb_per_s": round(bandwidth / 1e9, 1), "bound_steps_per_sec": round(bound, 1)}  # fmt: skip
    print(json.dumps(head), flush=True)

    single: dict[str, Callable[[], list[int]]] = {
        "lmforge eager": lambda: list(generate(model, prompts[0], n, temperature=0)),
    }
    batched: dict[str, Callable[[], list[list[int]]]] = {
        "lmforge eager": lambda: generate_batch(model, prompts, greedy),
    }
    compile_s = {}
    if not args.no_compile:
        started = time.perf_counter()
        list(generate(model, prompts[0], n, temperature=0, compile=True))  # compiles the batch-1 step
        compile_s["batch 1"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        generate_batch(model, prompts, greedy, compile=True)
        compile_s[f"batch {args.batch}"] = round(time.perf_counter() - started, 1)
        single["lmforge compiled"] = lambda: list(generate(model, prompts[0], n, temperature=0, compile=True))
        batched["lmforge compiled"] = lambda: generate_batch(model, prompts, greedy, compile=True)
    if not args.no_hf:
        theirs = hf_model(model)
        single["transformers"] = lambda: hf_generate(theirs, prompts[:1], n)[0]
        batched["transformers"] = lambda: hf_generate(theirs, prompts, n)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as workdir:
        llama_cpp = None if args.no_llama_cpp else llama_cpp_runner(model, Path(workdir), args.threads)
        if llama_cpp is not None:
            single["llama.cpp f32"] = lambda: llama_cpp(prompts[0], n)
        rows = []
        for kind, runners, n_rows in (("batch 1", single, 1), (f"batch {args.batch}", batched, args.batch)):
            for runner in runners.values():
                runner()  # warm-up (and the compiled code's first run)
            speeds: dict[str, list[float]] = {name: [] for name in runners}
            cpu_ms: dict[str, list[float]] = {name: [] for name in runners}
            outputs = {}
            for _ in range(args.rounds):
                for name, runner in runners.items():  # in turn, every round
                    seconds, cpu_seconds, outputs[name] = cpu_timed(runner)
                    speeds[name].append(n_rows * n / seconds)
                    cpu_ms[name].append(1000 * cpu_seconds / (n_rows * n))
            reference = outputs["lmforge eager"]
            for name in runners:
                row = {"flavor": flavor, "kind": kind, "impl": name,
                       **summary(speeds[name], bound * n_rows, cpu_ms[name]),
                       "same_tokens": outputs[name] == reference}  # fmt: skip
                if name == "lmforge compiled":
                    row["compile_s"] = compile_s[kind]
                rows.append(row)
                print(json.dumps(row), flush=True)
        rows.extend(bench_precisions(flavor, model, prompts[0], n, args, Path(workdir), bandwidth))
    if args.speculative:
        rows.extend(bench_speculative(flavor, model, prompts[0], n, args.rounds, bound))
    return rows


def bench_precisions(
    flavor: str, model: FamilyModel, prompt: list[int], n: int, args, workdir: Path, bandwidth: float
) -> list[dict]:
    """Batch 1 at bf16 and int8 (--precisions): lmforge, transformers and llama.cpp side by side, in
    turn round after round, each precision's runners timed together."""
    from lmforge.compress.quantize import quantize_model

    precisions = [p for p in args.precisions.split(",") if p != "fp32"]
    weights = weight_bytes_per_step(model) // 4  # weights one step reads
    rows = []
    for precision in precisions:
        runners: dict[str, Callable[[], list[int]]] = {}
        if precision == "bf16":
            ours = copy.deepcopy(model).to(torch.bfloat16)
            runners["lmforge bf16"] = lambda ours=ours: list(
                generate(ours, prompt, n, temperature=0, dtype=torch.bfloat16)
            )
            if not args.no_hf:
                theirs = hf_model(model).to(torch.bfloat16)
                runners["transformers bf16"] = lambda theirs=theirs: hf_generate(theirs, [prompt], n)[0]
            outtype, step_bytes = "bf16", 2 * weights
        elif precision == "int8":
            ours = quantize_model(copy.deepcopy(model), "int8-weight", None)
            runners["lmforge int8-weight"] = lambda ours=ours: list(
                generate(ours, prompt, n, temperature=0, dtype=torch.bfloat16)
            )
            outtype, step_bytes = "q8_0", weights * 34 // 32
        else:
            raise SystemExit(f"--precisions: unknown precision {precision!r} (fp32, bf16, int8)")
        llama_cpp = None if args.no_llama_cpp else llama_cpp_runner(model, workdir, args.threads, outtype)
        if llama_cpp is not None:
            runners[f"llama.cpp {outtype}"] = lambda llama_cpp=llama_cpp: llama_cpp(prompt, n)
        for runner in runners.values():
            runner()  # warm-up
        speeds: dict[str, list[float]] = {name: [] for name in runners}
        cpu_ms: dict[str, list[float]] = {name: [] for name in runners}
        outputs = {}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                seconds, cpu_seconds, outputs[name] = cpu_timed(runner)
                speeds[name].append(n / seconds)
                cpu_ms[name].append(1000 * cpu_seconds / n)
        reference = next(iter(outputs.values()))
        for name in runners:
            row = {"flavor": flavor, "kind": "batch 1", "impl": name,
                   **summary(speeds[name], bandwidth / step_bytes, cpu_ms[name]),
                   "same_tokens": outputs[name] == reference}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_speculative(
    flavor: str, model: FamilyModel, prompt: list[int], n: int, rounds: int, bound: float
) -> list[dict]:
    """Plain greedy vs speculative decoding (k = 4) with the target's first layer as the draft.

    With random weights the draft's agreement is set by construction: the residual writes (wo, w2)
    of the target's other layers are scaled by 0 (the draft's output is the target's: every proposal
    is accepted, the upper bound), 0.1 (partial agreement) or 1 (the model as built: about none).
    """
    rows = []
    for scale in (0.0, 0.1, 1.0):
        target = copy.deepcopy(model)
        with torch.no_grad():
            for name in list(target.layers)[1:]:
                target.layers[name].attention.wo.weight.mul_(scale)
                target.layers[name].feed_forward.w2.weight.mul_(scale)
        draft = copy.deepcopy(target)
        for name in list(draft.layers)[1:]:
            del draft.layers[name]
        want = list(generate(target, prompt, n, temperature=0))
        plain, speculative = [], []
        for _ in range(rounds):
            seconds, _ = timed(lambda target=target: list(generate(target, prompt, n, temperature=0)))
            plain.append(n / seconds)
            stats = SpeculativeStats()
            tokens = speculative_generate(target, draft, prompt, n, 4, stats=stats)
            seconds, got = timed(lambda tokens=tokens: list(tokens))
            speculative.append(n / seconds)
            assert got == want, "speculative decoding changed the greedy output"
        row = {"flavor": flavor, "kind": "batch 1", "impl": f"speculative k=4, draft 1 layer, others x{scale}",
               **summary(speculative, bound), "acceptance_rate": round(stats.acceptance_rate, 3),
               "tokens_per_target_forward": round(stats.tokens_per_target_forward, 2),
               "greedy_tokens_per_sec": round(statistics.median(plain), 1),
               "speedup_over_greedy": round(statistics.median(speculative) / statistics.median(plain), 2)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavors", default="tiny,124m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--speculative", action="store_true")
    parser.add_argument(
        "--precisions", default="fp32", help="fp32 and also bf16, int8 (batch 1): fp32,bf16,int8"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    rows = [row for flavor in args.flavors.split(",") for row in bench_flavor(flavor, args)]
    header = (
        f"{'flavor':<6} {'kind':<8} {'implementation':<40} {'tokens/s':>9} {'(min-max)':>15} {'of bound':>9}"
    )
    print(f"\n{header} {'cpu ms/token':>13}")
    for row in rows:
        spread = f"({row['spread'][0]}-{row['spread'][1]})"
        print(f"{row['flavor']:<6} {row['kind']:<8} {row['impl']:<40} {row['tokens_per_sec']:>9} {spread:>15} "
              f"{row['of_bandwidth_bound']:>9} {row.get('cpu_ms_per_token', ''):>13}")  # fmt: skip


if __name__ == "__main__":
    main()
