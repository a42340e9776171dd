"""Continuous batching under load: `lmforge serve` with many concurrent streaming clients.

    python benchmarks/serve_load.py [--run /work/runs/tiny-base] [--clients 32] [--requests 4]
                                    [--max-tokens 64] [--max-batch 32] [--alone 16] [--threads N]

1. The prompts: clients x requests snippets of the Python standard library's source (seeded), each
   generated alone in this process first (lmforge.infer.generate's one-sequence path, greedy): the
   reference every served completion must equal.
2. A server: `python -m lmforge serve RUN --port 0 --max-batch N` in a subprocess (RUN is only read).
3. One client alone: the first `--alone` prompts as streaming requests one after the other, before
   the load and again after it (so that a change in the machine's load hits both measurements
   alike): its tokens/s = completion tokens / wall time, of both passes together.
4. Load: `--clients` clients at once, each sending `--requests` streaming requests one after the
   other (greedy). Every completion is checked against its reference; the aggregate tokens/s = all
   completion tokens / the wall time from the first request to the last token.

--threads sets OMP_NUM_THREADS of the server (and torch's threads here for the references); by
default both keep torch's default (the machine's cores). On a machine that other processes share,
more threads than free cores make OpenMP's threads spin against each other: use --threads 1 there.

Prints one JSON line: both rates, their ratio, whether every completion matched, time to first
token under load (median, p90), and the server's decode steps (tokens per step = the batch the
engine kept). The clients run in this process, on the same CPU as the server: their parsing of the
streams is part of what the server's machine pays here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import torch

SOURCES = ["argparse.py", "json/decoder.py", "textwrap.py", "shlex.py", "heapq.py", "csv.py", "string.py"]


def prompts(n: int, seed: int = 0) -> list[str]:
    """n snippets of stdlib source, 2 to 6 whole lines each, starting at a random line."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [line for name in SOURCES for line in (stdlib / name).read_text().splitlines(keepends=True)]
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        start = rng.randrange(len(lines) - 6)
        snippet = "".join(lines[start : start + rng.randint(2, 6)])
        if snippet.strip() and len(snippet) < 240:
            out.append(snippet)
    return out


def references(run: str, texts: list[str], max_tokens: int) -> list[tuple[str, int]]:
    """Each prompt's greedy completion generated alone: (text, completion tokens)."""
    from lmforge.api import load_checkpoint
    from lmforge.infer.generate import generate
    from lmforge.infer.stop import TextStream
    from lmforge.rundir import resolve_checkpoint, run_precision

    ckpt_dir = resolve_checkpoint(run)
    model, tokenizer = load_checkpoint(ckpt_dir)
    dtype = run_precision(ckpt_dir, torch.device("cpu"))  # the server's, on this CPU
    eos = tokenizer.token_to_id("<|eos|>")
    out = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        tokens = list(generate(model, ids, max_tokens, temperature=0, eos_id=eos, dtype=dtype))
        stream = TextStream(tokenizer.decode)
        for token in tokens:
            if token != eos:
                stream.push(token)
        stream.finish()
        out.append((stream.text, len(tokens)))
    return out


def start_server(run: str, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "lmforge", "serve", run, "--port", "0", "--max-batch", str(max_batch)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if " at http://" not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, line.split(" at ", 1)[1].split()[0].removesuffix("/v1")


async def stream_one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    """One streaming request → (text, completion tokens, seconds to the first text)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first = None
    pieces, n_tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                if first is None:
                    first = time.perf_counter() - started
                pieces.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                n_tokens = chunk["usage"]["completion_tokens"]
    return "".join(pieces), n_tokens, first if first is not None else time.perf_counter() - started


async def one_client(url: str, texts: list[str], max_tokens: int) -> list[tuple[str, int, float]]:
    """Requests one after the other, as one user would send them."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return [await stream_one(client, text, max_tokens) for text in texts]


async def many_clients(
    url: str, groups: list[list[str]], max_tokens: int
) -> list[list[tuple[str, int, float]]]:
    return await asyncio.gather(*(one_client(url, group, max_tokens) for group in groups))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="/work/runs/tiny-base")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--alone", type=int, default=16, help="requests of the one-client baseline")
    parser.add_argument("--threads", type=int, help="the server's OMP_NUM_THREADS (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    texts = prompts(args.clients * args.requests)
    started = time.perf_counter()
    want = references(args.run, texts, args.max_tokens)
    print(f"references: {len(texts)} prompts alone in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    process, url = start_server(args.run, args.max_batch, args.threads)
    try:
        started = time.perf_counter()
        alone = asyncio.run(one_client(url, texts[: args.alone], args.max_tokens))
        alone_s = time.perf_counter() - started
        before = httpx.get(f"{url}/health").json()
        groups = [texts[c * args.requests : (c + 1) * args.requests] for c in range(args.clients)]
        started = time.perf_counter()
        loaded = asyncio.run(many_clients(url, groups, args.max_tokens))
        load_s = time.perf_counter() - started
        after = httpx.get(f"{url}/health").json()
        started = time.perf_counter()
        alone_again = asyncio.run(one_client(url, texts[: args.alone], args.max_tokens))
        alone_again_s = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait()

    results = [result for group in loaded for result in group]
    got = [(text, n) for text, n, _ in results]
    mismatches = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    for i in mismatches:  # where each one parts from its reference, for a look
        (text, n), (want_text, want_n) = got[i], want[i]
        at = next(
            (k for k, (a, b) in enumerate(zip(text, want_text, strict=False)) if a != b),
            min(len(text), len(want_text)),
        )
        print(f"mismatch {i}: {n} tokens (alone {want_n}), from character {at}: {text[at - 20 : at + 20]!r} "
              f"(alone {want_text[at - 20 : at + 20]!r})", file=sys.stderr)  # fmt: skip
    alone_match = all((t, n) == want[i] for run in (alone, alone_again) for i, (t, n, _) in enumerate(run))
    alone_tokens = sum(n for _, n, _ in alone + alone_again)
    alone_rate = alone_tokens / (alone_s + alone_again_s)
    load_tokens = sum(n for _, n in got)
    first_token = sorted(f for _, _, f in results)
    steps = after["decode_steps"] - before["decode_steps"]
    report = {
        "run": args.run,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "threads": args.threads or torch.get_num_threads(),
        "alone_tokens_per_s": round(alone_rate, 1),
        "alone_tokens_per_s_before_after": [
            round(sum(n for _, n, _ in a) / t, 1) for a, t in ((alone, alone_s), (alone_again, alone_again_s))
        ],
        "load_tokens_per_s": round(load_tokens / load_s, 1),
        "ratio": round((load_tokens / load_s) / alone_rate, 2),
        "load_tokens": load_tokens,
        "load_s": round(load_s, 2),
        "all_match_alone": not mismatches and alone_match,
        "mismatches": mismatches,
        "first_token_s_median": round(statistics.median(first_token), 3),
        "first_token_s_p90": round(first_token[int(0.9 * (len(first_token) - 1))], 3),
        "tokens_per_decode_step": round(
            (after["completion_tokens"] - before["completion_tokens"]) / max(steps, 1), 2
        ),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
