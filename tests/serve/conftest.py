"""What the server tests share: a run directory of a sharp debug model with the chat template, a
`lmforge serve` process on it, and the completions each prompt gets when generated alone."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmforge.infer.generate import generate
from lmforge.infer.stop import TextStream

CONTEXT = 1024  # long enough that a generation of ~1000 tokens outlasts a client's disconnect by seconds
MAX_BATCH = 4  # fewer rows than the concurrency test's clients: some wait, then join mid-flight


@pytest.fixture(scope="module")
def sharp_run(tmp_path_factory, prepared_dir, session_debug_config) -> Path:
    """A run directory, written by the trainer's own checkpoint writer, of a debug llama with random
    large weights (std 0.5, as tests/infer's sharp models: each greedy choice depends on what the
    row attends to, so a row that saw another row's cache would go wrong) and a tokenizer with the
    chat tokens (so /v1/chat/completions serves it). No training: nothing here needs a good model."""
    from lmforge.data.sft import add_chat_tokens
    from lmforge.data.tokenizer import load_tokenizer, save_tokenizer
    from lmforge.models import build_model
    from lmforge.rundir import run_model_config
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.optim import build_optimizer

    root = tmp_path_factory.mktemp("serve")
    tokenizer_path = root / "tokenizer.json"
    tokenizer = add_chat_tokens(load_tokenizer(prepared_dir / "tokenizer.json"))
    save_tokenizer(tokenizer, tokenizer_path)
    cfg = session_debug_config(data={"seq_len": CONTEXT})
    torch.manual_seed(0)
    model = build_model(run_model_config(cfg.model, CONTEXT, tokenizer.get_vocab_size()))
    weights = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=weights) * 0.5)
    run = root / "sharp-chat"
    save_checkpoint(
        run, 1, model, build_optimizer(model, cfg.optim, "cpu"), {"loader": {}}, cfg, tokenizer_path, 1
    )
    return run


@dataclass
class Server:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    max_batch: int
    ready_line: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def start_server(run: Path, log_dir: Path, max_batch: int, timeout: float = 60) -> Server:
    """`python -m lmforge serve RUN --port 0 --max-batch N` → the server, once it printed its URL."""
    stderr_path = log_dir / "server.stderr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        # on the CPU, as the references: greedy equality is exact only on the same device
        [
            sys.executable,
            "-m",
            "lmforge",
            "serve",
            str(run),
            "--port",
            "0",
            "--max-batch",
            str(max_batch),
            "--device",
            "cpu",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("w"),
        text=True,
        env=env,
    )
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            process.kill()
            raise AssertionError(f"no ready line in {timeout} s: {stderr_path.read_text()}")
    line = process.stdout.readline().strip()
    if " at http://" not in line:
        process.kill()
        raise AssertionError(f"unexpected first line {line!r}: {stderr_path.read_text()}")
    url = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
    return Server(process, url, max_batch, line, stderr_path)


@pytest.fixture(scope="module")
def server(sharp_run, tmp_path_factory):
    server = start_server(sharp_run, tmp_path_factory.mktemp("log"), MAX_BATCH)
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def reference(sharp_run):
    """reference(ids, max_tokens, end_ids, stop=(), **sampling) → (text, n_tokens, finish_reason) of
    the prompt generated alone by lmforge.infer.generate's one-sequence path, in this process."""
    from lmforge.api import load

    model, tokenizer = load(sharp_run)

    def alone(ids: list[int], max_tokens: int, end_ids, stop=(), **sampling) -> tuple[str, int, str]:
        tokens = list(generate(model, ids, max_tokens, **sampling))  # eos_id None: cut below
        stream = TextStream(tokenizer.decode, stop)
        for n, token in enumerate(tokens, 1):
            if token in end_ids:
                stream.finish()
                return stream.text, n, "stop"
            stream.push(token)
            if stream.stopped:
                return stream.text, n, "stop"
        stream.finish()
        return stream.text, len(tokens), "length"

    alone.tokenizer = tokenizer  # type: ignore[attr-defined]
    alone.model = model  # type: ignore[attr-defined]
    return alone
