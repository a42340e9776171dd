"""The `lmforge` command: command name → function; each function's typed signature is its CLI.

jsonargparse reads the signatures and docstrings below (and, for `pretrain`, the RunConfig
dataclasses) to build the parser, type-check values and write `--help`. A user mistake ends with
one line on stderr and exit code 2; only a bug in lmforge shows a traceback.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from lmforge.bench import bench
from lmforge.config import RunConfig, explain_parse_error, namespace_to_config, read_config_file
from lmforge.errors import ConfigError, LmforgeError, report


def quickstart(out: str = "runs/quickstart", max_steps: int | None = None) -> None:
    """Train a tiny llama on the Python standard library's own source, evaluate it, print samples.

    Args:
        out: Run directory (running it again continues or re-reports the same run).
        max_steps: Training steps (default: 340 on CPU, 2000 on a GPU).
    """
    from lmforge.quickstart import quickstart as run
    from lmforge.runtime import process_age_s

    run(out, max_steps, started=time.perf_counter() - process_age_s())  # the interpreter's start counts


def prepare(
    source: str,
    out: str,
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    seed: int = 1337,
    num_workers: int | None = None,
    tokenizer: str | None = None,
) -> None:
    """Tokenize a corpus into memory-mapped shards with a tokenizer and a manifest.

    Args:
        source: stdlib (the Python standard library's source), python (the standard library and site-packages), a text file, a directory, a glob, a .jsonl or .parquet file.
        out: Output directory (tokenizer.json, train_*.bin, val_*.bin, manifest.json).
        vocab_size: Vocabulary size of the byte-level BPE tokenizer to train.
        val_fraction: Fraction of documents held out for validation.
        seed: Seed of the train/validation split.
        num_workers: Tokenizer worker processes (default: all cores).
        tokenizer: Use this tokenizer.json instead of training one.
    """
    from lmforge.data.prepare import prepare_data

    manifest = prepare_data(source, out, vocab_size, val_fraction, seed, num_workers, tokenizer)
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}))


def generate(
    run: str,
    prompt: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int | None = None,
    device: str = "auto",
    chat: bool = False,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: list[str] | str | None = None,
    compile: bool = False,
    draft: str | None = None,
    draft_tokens: int = 4,
    input: str | None = None,
    output: str | None = None,
    batch_size: int = 8,
    tp: int = 1,
) -> None:
    """Stream text from a trained model (uses the KV cache), or complete every prompt of a JSONL file.

    Args:
        run: Run directory (its newest checkpoint) or checkpoint directory.
        prompt: Text to continue.
        max_new_tokens: Tokens to generate at most.
        temperature: Sampling temperature; 0 is greedy.
        top_k: Sample among the k most likely tokens.
        top_p: Sample among the most likely tokens covering this probability.
        seed: Sampling seed (default: random).
        device: auto, cpu, cuda or cuda:N.
        chat: The prompt is a user message: render it in the model's chat template (a model fine-tuned with data.task sft) and print the assistant's answer.
        min_p: Sample among the tokens at least this fraction as likely as the most likely one.
        repetition_penalty: Above 1, tokens already in the prompt or the output become less likely (1: off).
        stop: A string that ends the text (not shown), or a JSON list of them: --stop '["\\n\\n", "def "]'.
        compile: torch.compile the decode step (pays for long generations and batches).
        draft: Speculative decoding (greedy): a smaller run with the same tokenizer proposes tokens; prints the acceptance rate.
        draft_tokens: Tokens the draft proposes per step of the model.
        input: A JSONL file with a "prompt" per line: write one completion per line to --output.
        output: The JSONL file of completions (resumes where it stopped; under torchrun the ranks split the prompts).
        batch_size: Prompts generated together with --input.
        tp: Under torchrun, tensor parallelism: each model is split over this many processes (a model too large for one device); the groups of tp processes split an --input file.
    """
    from lmforge.infer.generate import check_sampling_args
    from lmforge.rundir import resolve_checkpoint
    from lmforge.runtime import resolve_device

    stop = [stop] if isinstance(stop, str) else list(stop or [])
    # Before loading: a typo costs nothing.
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop)
    if (input is None) != (output is None):
        raise ConfigError("--input and --output go together: prompts in, completions out")
    if input is not None and prompt:
        raise ConfigError("--prompt and --input: give one prompt, or a file of them")
    if draft is not None and (temperature != 0 or input is not None or min_p or repetition_penalty != 1.0):
        raise ConfigError(
            "--draft verifies the draft's tokens greedily: use it with --temperature 0, without --min-p, "
            "--repetition-penalty or --input"
        )
    if draft is not None and draft_tokens < 1:
        raise ConfigError(f"--draft-tokens must be >= 1, got {draft_tokens}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {tp}")
    if world_size % tp:
        raise ConfigError(f"--tp {tp} must divide the number of processes torchrun starts ({world_size})")
    if world_size > 1 and input is None and tp != world_size:
        raise ConfigError(
            "under torchrun, generate needs --input and --output (each rank takes a share), or --tp "
            "equal to the number of processes (one model split over all of them)"
        )
    if tp > 1 and (compile or draft is not None):
        raise ConfigError("--tp decodes eagerly and without a draft: drop --compile and --draft")
    dev = resolve_device(device)
    ckpt_dir = resolve_checkpoint(run)
    if tp > 1:
        from lmforge.parallel.inference import check_tensor_parallel

        check_tensor_parallel(ckpt_dir, tp)  # before the processes meet: a refusal costs nothing
    from lmforge.parallel.mesh import ParallelDims, local_device
    from lmforge.train.distributed import process_group

    if world_size > 1:
        dev = local_device(dev)
    dims = ParallelDims(pp=1, dp_replicate=1, dp_shard=world_size // tp, tp=tp)
    with process_group(dims, dev, timeout_s=1800):
        _generate_in(ckpt_dir, dev, tp, world_size, run, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                     chat, min_p, repetition_penalty, stop, compile, draft, draft_tokens, input, output, batch_size)  # fmt: skip


def _generate_in(
    ckpt_dir: Path, dev, tp: int, world_size: int, run: str, prompt: str, max_new_tokens: int, temperature: float,
    top_k: int | None, top_p: float | None, seed: int | None, chat: bool, min_p: float | None,
    repetition_penalty: float, stop: list[str], compile: bool, draft: str | None, draft_tokens: int,
    input: str | None, output: str | None, batch_size: int,
) -> None:  # fmt: skip
    """`generate` inside its process group (a no-op in one process): load, then one prompt or a file."""
    from lmforge.api import load_checkpoint
    from lmforge.infer import generate as generate_module
    from lmforge.infer.stop import TextStream
    from lmforge.models import spec_of
    from lmforge.rundir import decode_precision, resolve_checkpoint, run_precision

    mesh = None
    if tp > 1:
        from lmforge.data.tokenizer import load_tokenizer
        from lmforge.parallel.inference import inference_mesh, load_tensor_parallel, shared_seed

        mesh = inference_mesh(dev, world_size, tp)
        model = load_tensor_parallel(ckpt_dir, mesh["tp"], dev)
        tokenizer = load_tokenizer(ckpt_dir / "tokenizer.json")
        if seed is None and temperature > 0:  # the processes of a model must draw the same tokens
            seed = shared_seed()
    else:
        model, tokenizer = load_checkpoint(ckpt_dir, device=dev)
    if spec_of(model).encoder:
        raise ConfigError(
            f"{run} is an encoder (model family {spec_of(model).name}): it does not generate text"
        )
    # One prompt decodes row by row (decode_precision; with --draft the model itself runs eagerly, only
    # the draft compiles); a file's batches compute in the run's precision.
    if input is not None:
        dtype = run_precision(ckpt_dir, dev)
    else:
        dtype = decode_precision(ckpt_dir, dev, compiled=compile and draft is None)
    eos_id = tokenizer.token_to_id("<|eos|>")
    if chat:
        from lmforge.data.sft import CHAT_TOKENS, render

        eos_id = tokenizer.token_to_id(CHAT_TOKENS[1])  # the assistant's turn ends there

    def encode(text: str) -> list[int]:
        if chat:  # the text is a user message: the model answers it in its chat template
            return render([{"role": "user", "content": text}], tokenizer, generation_prompt=True)[0]
        return tokenizer.encode(text).ids

    if input is not None and output is not None:
        from lmforge.infer.sampling import SamplingParams

        params = SamplingParams(
            max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, tuple(stop), seed
        )
        _generate_file(
            model, tokenizer, params, input, output, batch_size, eos_id, encode, dtype, compile, mesh
        )
        return
    # Under --tp every rank of the model decodes alike (the same tokens): rank 0 prints them.
    quiet = mesh is not None and mesh.get_rank() != 0
    with (
        open(os.devnull, "w") if quiet else contextlib.nullcontext(sys.stdout) as text_out,
        contextlib.redirect_stdout(text_out),
    ):
        if draft is not None:
            draft_model, draft_tokenizer = load_checkpoint(resolve_checkpoint(draft), device=dev)
            if spec_of(draft_model).encoder or draft_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ConfigError(
                    f"the draft {draft} is not a decoder with the tokenizer of {run}: speculative decoding needs one"
                )
        prompt_ids = encode(prompt)
        if not chat:
            print(prompt, end="", flush=True)
        stats = None
        started = time.perf_counter()
        if draft is not None:
            from lmforge.infer.speculative import SpeculativeStats, speculative_generate

            stats = SpeculativeStats()
            tokens = speculative_generate(
                model,
                draft_model,
                prompt_ids,
                max_new_tokens,
                draft_tokens,
                eos_id,
                dtype,
                stats,
                compile=compile,
            )
        else:
            # The options left at their defaults are not passed: a call with only the classic arguments
            # stays exactly that.
            options: dict[str, Any] = {}
            if min_p is not None:
                options["min_p"] = min_p
            if repetition_penalty != 1.0:
                options["repetition_penalty"] = repetition_penalty
            if compile:
                options["compile"] = True
            tokens = generate_module.generate(
                model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id, dtype, **options
            )
        stream = TextStream(tokenizer.decode, stop)
        for token_id in tokens:
            if token_id == eos_id:
                break
            print(stream.push(token_id), end="", flush=True)
            if stream.stopped:
                break
        print(stream.finish())
        if stats is not None:
            seconds = time.perf_counter() - started
            print(
                f"speculative decoding: acceptance rate {stats.acceptance_rate:.3f} "
                f"({stats.accepted}/{stats.proposed} draft tokens), "
                f"{stats.tokens_per_target_forward:.2f} tokens per forward of the model, "
                f"{stats.new_tokens / seconds:.1f} tokens/s",
                file=sys.stderr,
            )


def _generate_file(
    model, tokenizer, params, input: str, output: str, batch_size: int, eos_id: int | None, encode, dtype,
    compile: bool, mesh,
) -> None:  # fmt: skip
    """`generate --input`: every prompt of the file; under torchrun this rank's share (rank 0 merges).
    With a (dp, tp) mesh (--tp) the share is the model's dp group's, and its tp rank 0 writes it."""
    import torch.distributed as dist

    from lmforge.infer.files import generate_file

    distributed = dist.is_initialized()
    rank, world_size, writer = (dist.get_rank(), dist.get_world_size(), True) if distributed else (0, 1, True)
    if mesh is not None:
        rank, world_size, writer = (
            mesh["dp"].get_local_rank(),
            mesh["dp"].size(),
            mesh["tp"].get_local_rank() == 0,
        )
    summary = generate_file(
        model, tokenizer, input, output, params, batch_size=batch_size, eos_id=eos_id, encode=encode,
        dtype=dtype, compile=compile, rank=rank, world_size=world_size, writer=writer,
        barrier=dist.barrier if distributed else lambda: None,
    )  # fmt: skip
    if rank == 0 and writer:
        print(json.dumps(summary))


def serve(
    run: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    device: str = "auto",
    compile: bool = False,
) -> None:
    """Serve a model over HTTP with OpenAI's completions API, batching concurrent requests (docs/serve.md).

    Args:
        run: Run directory (its newest checkpoint) or checkpoint directory; the model's name is the run's.
        host: Address to listen on (0.0.0.0: every interface).
        port: Port to listen on (0: any free port; the line printed when ready names it).
        max_batch: Requests decoded together at most (rows of the KV cache); more wait for a free row.
        device: auto, cpu, cuda or cuda:N.
        compile: torch.compile the decode step (compiled at start-up).
    """
    try:
        from lmforge.serve.server import serve as run_server
    except ImportError as err:
        raise ConfigError(
            f"lmforge serve needs FastAPI and uvicorn ({err.name} is missing): pip install 'lmforge[serve]'"
        ) from None
    run_server(run, host, port, max_batch, device, compile)


def evaluate(
    run: str,
    data: str | None = None,
    seq_len: int | None = None,
    batches: int = 50,
    batch_size: int = 8,
    device: str = "auto",
    tasks: str | None = None,
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
) -> None:
    """Print the loss, perplexity and bits per byte of a trained model, or its scores on lm-evaluation-harness tasks (one JSON line).

    Args:
        run: Run directory (its newest checkpoint) or checkpoint directory.
        data: Any text source the data command accepts (a file, directory, glob, .jsonl, .parquet, stdlib), tokenized with the model's tokenizer; default: the run's validation split.
        seq_len: Window length for --data (default: the model's context length).
        batches: Batches to average over (the first ones, in order).
        batch_size: Sequences per batch.
        device: auto, cpu, cuda or cuda:N.
        tasks: lm-evaluation-harness tasks, NAME[,NAME]: lmforge's own (stdlib_mc, stdlib_ppl, stdlib_gen), those of --include-path, or lm-eval's (hellaswag, ...: their datasets need a network). Needs pip install 'lmforge[eval]'.
        include_path: A folder of task YAML files for --tasks.
        limit: With --tasks: the first N documents of each task.
        num_fewshot: With --tasks: examples before each question (default: each task's own).
    """
    if tasks is None and (include_path, limit, num_fewshot) != (None, None, None):
        raise ConfigError("--include-path, --limit and --num-fewshot go with --tasks")
    if tasks is not None:
        if data is not None:
            raise ConfigError("eval takes --data or --tasks, not both")
        try:
            from lmforge.harness import evaluate_tasks
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith(("lm_eval", "datasets")):
                raise
            raise ConfigError(
                "--tasks needs EleutherAI's lm-evaluation-harness: pip install 'lmforge[eval]'"
            ) from None
        names = [name.strip() for name in tasks.split(",") if name.strip()]
        print(json.dumps(evaluate_tasks(run, names, include_path, limit, num_fewshot, batch_size, device)))
        return
    from lmforge.api import evaluate_text, load_checkpoint
    from lmforge.config import load_config
    from lmforge.data.classify import val_examples
    from lmforge.data.loader import val_batches
    from lmforge.data.mlm import Masker
    from lmforge.data.tokenizer import special_ids
    from lmforge.evaluate.classify import evaluate_classifier
    from lmforge.evaluate.mlm import evaluate_masked_lm
    from lmforge.evaluate.perplexity import bits_per_byte, evaluate_loss, token_byte_lengths
    from lmforge.models import spec_of
    from lmforge.rundir import data_dir_for, resolve_checkpoint, run_precision
    from lmforge.runtime import PRECISION_NAMES, resolve_device

    if data is not None:
        print(json.dumps(evaluate_text(run, data, seq_len, batch_size, batches, resolve_device(device))))
        return
    dev = resolve_device(device)
    ckpt_dir = resolve_checkpoint(run)
    cfg = load_config(ckpt_dir / "config.yaml")
    data_dir = data_dir_for(cfg.data, run_dir=ckpt_dir.parent.parent)
    model, tokenizer = load_checkpoint(ckpt_dir, device=dev)
    dtype = run_precision(ckpt_dir, dev)  # the run's precision
    if cfg.data.task == "classify":  # accuracy and macro-F1 on the held-out split
        pad_id = special_ids(tokenizer)["pad"]
        examples = val_examples(data_dir, batch_size, cfg.data.seq_len, batches, pad_id)
        record = evaluate_classifier(model, examples, dev, dtype)
        print(json.dumps({"checkpoint": str(ckpt_dir), **record, "labels": cfg.data.labels}))
        return
    if cfg.data.task == "sft":
        raise ConfigError(
            f"{run} is an SFT run: evaluate it on text with --data, or try lmforge generate --chat"
        )
    val = val_batches(data_dir, batch_size, cfg.data.seq_len, batches)
    if spec_of(model).encoder:  # masked LM: the loss and top-1 accuracy at the masked positions
        masked = evaluate_masked_lm(model, Masker(tokenizer, cfg.train.seed).batches(val), dev, dtype)
        print(json.dumps({"checkpoint": str(ckpt_dir), **masked, "dtype": PRECISION_NAMES[dtype]}))
        return
    result = evaluate_loss(model, val, dev, dtype)
    bpb = bits_per_byte(result["val_loss"], (t for _, t in val), token_byte_lengths(tokenizer))
    print(json.dumps({"checkpoint": str(ckpt_dir), **result, "val_bits_per_byte": bpb,
                      "dtype": PRECISION_NAMES[dtype]}))  # fmt: skip


def classify(run: str, text: str | None = None, input: str | None = None, device: str = "auto") -> None:
    """Predict the class of texts with a classification run (data.task classify): one JSON line each.

    Args:
        run: Run directory (its newest checkpoint) or checkpoint directory.
        text: One text to classify.
        input: A file of texts: .jsonl (a "text" key per line) or plain text (one text per line).
        device: auto, cpu, cuda or cuda:N.
    """
    import torch

    from lmforge.api import load_checkpoint
    from lmforge.config import load_config
    from lmforge.data.classify import pad_rows
    from lmforge.data.tokenizer import special_ids
    from lmforge.rundir import resolve_checkpoint, run_precision
    from lmforge.runtime import autocast, resolve_device

    if (text is None) == (input is None):
        raise ConfigError("classify needs exactly one of --text and --input")
    texts = [text] if text is not None else _read_texts(Path(input))  # type: ignore[arg-type]
    ckpt_dir = resolve_checkpoint(run)
    cfg = load_config(ckpt_dir / "config.yaml")
    if cfg.data.task != "classify" or not cfg.data.labels:
        raise ConfigError(f"{run} is not a classification run (its data.task is {cfg.data.task})")
    dev = resolve_device(device)
    model, tokenizer = load_checkpoint(ckpt_dir, device=dev)
    ids = special_ids(tokenizer)
    for start in range(0, len(texts), 32):
        chunk = texts[start : start + 32]
        inputs, mask = pad_rows(
            [[ids["bos"], *e.ids] for e in tokenizer.encode_batch(chunk)], cfg.data.seq_len, ids["pad"]
        )
        with torch.no_grad(), autocast(dev, run_precision(ckpt_dir, dev)):
            probs = model(inputs.to(dev), pad_mask=mask.to(dev)).float().softmax(-1).cpu()
        for one, p in zip(chunk, probs, strict=True):
            best = int(p.argmax())
            print(
                json.dumps(
                    {
                        "text": one[:60],
                        "label": cfg.data.labels[best],
                        "probability": round(float(p[best]), 4),
                    }
                )
            )


def _read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"--input {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for lineno, line in enumerate(lines, 1):
        try:
            texts.append(str(json.loads(line)["text"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"--input {path}, line {lineno}: expected a JSON object with a 'text' key"
            ) from None
    return texts


def export(
    run: str,
    out: str | None = None,
    format: Literal["lmforge", "hf", "peft", "gguf"] = "lmforge",
    outtype: Literal["f32", "bf16", "q8_0"] = "f32",
) -> None:
    """Gather a checkpoint (written by any layout) into one safetensors file with its config and tokenizer.

    Args:
        run: Run directory (its newest checkpoint) or checkpoint directory.
        out: Output directory (default: RUN/export, RUN/export-hf or RUN/export-peft; for a checkpoint directory, in its run: export-step_N, ...); for gguf the output file (default: RUN/model-OUTTYPE.gguf; for a checkpoint directory RUN/model-step_N-OUTTYPE.gguf).
        format: lmforge (model.safetensors, config.yaml, tokenizer.json), hf (a Hugging Face transformers model directory: AutoModelForCausalLM.from_pretrained(OUT) and AutoTokenizer load it), peft (a LoRA run's adapters alone, as PEFT saves them) or gguf (one file for llama.cpp, Ollama and LM Studio; needs the gguf package). lmforge, hf and gguf write a LoRA run merged.
        outtype: gguf's weight type: f32 (exact), bf16, or q8_0 (8-bit blocks, about a quarter of f32); norms stay f32.
    """
    from lmforge.rundir import export_checkpoint, resolve_checkpoint

    ckpt_dir = resolve_checkpoint(run)
    if format != "gguf" and outtype != "f32":
        raise ConfigError(f"--outtype {outtype} is for --format gguf")
    if format == "gguf":
        from lmforge.gguf import export_gguf

        default = _export_home(run, ckpt_dir) / f"model{_export_suffix(run, ckpt_dir)}-{outtype}.gguf"
        path = export_gguf(ckpt_dir, Path(out) if out else default, outtype)
        record = {"exported": str(path), "format": format, "outtype": outtype, "bytes": path.stat().st_size}
        print(json.dumps(record))
        return
    name = {"lmforge": "export", "hf": "export-hf", "peft": "export-peft"}[format]
    out_dir = Path(out) if out else _export_home(run, ckpt_dir) / f"{name}{_export_suffix(run, ckpt_dir)}"
    if format == "lmforge":
        path = export_checkpoint(ckpt_dir, out_dir)
    else:
        from lmforge.hf import export_hf, export_peft

        path = (export_hf if format == "hf" else export_peft)(ckpt_dir, out_dir)
    print(json.dumps({"exported": str(path), "format": format, "bytes": path.stat().st_size}))


def _export_home(run: str, ckpt_dir: Path) -> Path:
    """Where an export goes without --out: the run directory, also when RUN names one of its
    checkpoints (never into the checkpoint: a file its manifest lacks fails its check)."""
    if ckpt_dir != Path(run):
        return Path(run)
    return ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else ckpt_dir.parent


def _export_suffix(run: str, ckpt_dir: Path) -> str:
    """'-step_N' when RUN names a checkpoint (its export is told apart from the newest one's)."""
    return f"-{ckpt_dir.name}" if ckpt_dir == Path(run) else ""


def import_hf(hf_dir: str, out: str | None = None) -> None:
    """Make a run directory from a Hugging Face transformers model directory (config.json, safetensors, tokenizer.json).

    Args:
        hf_dir: The model directory (what save_pretrained writes; `lmforge export --format hf` writes one).
        out: The run directory to create (required); its checkpoint works with generate, eval and lmforge.load.
    """
    from lmforge.hf import import_hf as run_import

    if out is None:
        raise ConfigError("import needs --out RUN: the run directory to create")
    path = run_import(Path(hf_dir), Path(out))
    print(json.dumps({"imported": str(path)}))


def pretrain(config: RunConfig, out: str, resume: str = "no", resume_from: str | None = None) -> None:
    """resume: no (a new run), latest (the newest valid checkpoint, which must exist) or auto (the
    newest valid checkpoint if the run has one, else a new run: for requeued jobs)."""
    from lmforge.train.pretrain import pretrain as run
    from lmforge.train.resume import Resume

    modes: dict[str, Resume] = {"no": False, "latest": True, "auto": "auto"}
    result = run(config, out, resume_from or modes[resume])
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line, from rank 0
        print(json.dumps(result))


def finetune(
    config: RunConfig, out: str, init: str | None, resume: str = "no", resume_from: str | None = None
) -> None:
    """`pretrain` from the weights of `init` (train.init): the model section and tokenizer are the init's."""
    from dataclasses import replace

    if init is not None:
        config = replace(config, train=replace(config.train, init=init))
    if config.train.init is None:
        raise ConfigError(
            "finetune needs --init RUN_OR_CHECKPOINT: the run or checkpoint whose weights it starts from"
        )
    pretrain(config, out, resume, resume_from)


def _required(value, option: str):
    """`value` of a required option that the CLI declares optional (so that it is `--name`, not positional)."""
    if value is None:
        raise ConfigError(f"this command needs {option}")
    return value


def compress_quantize(
    run: str,
    scheme: Literal["int8-weight", "int8-dynamic", "int4-weight", "float8-weight"] | None = None,
    out: str | None = None,
    group_size: int | None = None,
) -> None:
    """Quantize a checkpoint's linear layers (torchao) into a new run directory.

    Args:
        run: Run directory (its newest checkpoint) or checkpoint directory.
        scheme: int8-weight (int8 weights, per channel), int8-dynamic (int8 weights and per-token int8 activations), int4-weight (4-bit weights per group) or float8-weight (float8 e4m3 weights, per channel; needs a GPU that computes float8).
        out: The run directory to write; generate, eval and lmforge.load read it.
        group_size: Weights per int4 group (default: the run's qat.group_size, else 32).
    """
    from lmforge.compress.quantize import quantize_run
    from lmforge.rundir import resolve_checkpoint

    scheme, out = (
        _required(scheme, "--scheme int8-weight|int8-dynamic|int4-weight|float8-weight"),
        _required(out, "--out DIR"),
    )
    path = quantize_run(resolve_checkpoint(run), scheme, Path(out), group_size)
    print(json.dumps({"quantized": str(path), "scheme": scheme}))


def compress_prune(
    run: str,
    method: Literal["magnitude", "heads-channels", "2:4"] | None = None,
    out: str | None = None,
    sparsity: float = 0.5,
    scope: Literal["global", "layer"] = "global",
    calibration_batches: int = 8,
    recover_steps: int = 0,
    recover_distill: bool = False,
) -> None:
    """Prune a checkpoint into a new run directory, optionally with a recovery fine-tune.

    Args:
        run: Run directory (its newest checkpoint) or checkpoint directory.
        method: magnitude (the smallest weights of the linear layers set to zero), heads-channels (whole attention heads and MLP channels removed by their activation importance on calibration batches: the matrices shrink) or 2:4 (two of every four consecutive weights zero).
        out: The run directory to write.
        sparsity: Fraction to remove: of the weights (magnitude), of the attention heads (whole kv groups: a key/value head with its query heads) and of the MLP channels in every layer (heads-channels, rounded half up); 2:4 is always 0.5.
        scope: magnitude: one threshold over all the linear layers (global) or the same fraction in each (layer).
        calibration_batches: Batches of the run's training data that score heads and channels (heads-channels).
        recover_steps: Fine-tune the pruned model for this many steps on the run's data, its masks kept (0: none).
        recover_distill: The recovery fine-tune distills from the unpruned model (distill section) instead of plain cross-entropy.
    """
    from lmforge.compress.prune import prune_checkpoint, prune_for_recovery, recovery_config
    from lmforge.rundir import resolve_checkpoint

    method, out = _required(method, "--method magnitude|heads-channels|2:4"), _required(out, "--out DIR")
    if recover_distill and not recover_steps:
        raise ConfigError("--recover-distill goes with --recover-steps N")
    source = resolve_checkpoint(run)
    if not recover_steps:
        print(json.dumps(prune_checkpoint(source, method, Path(out), sparsity, scope, calibration_batches)))
        return
    # The pruned model is OUT/base; OUT is a fine-tuning run from it (training: the CLI's to start,
    # as lmforge.compress does not import lmforge.train). Run again, it resumes.
    from lmforge.train.pretrain import pretrain as train

    base = prune_for_recovery(source, method, Path(out), sparsity, scope, calibration_batches)
    result = train(recovery_config(source, base, recover_steps, recover_distill), out, "auto")
    print(json.dumps({"pruned": str(base), "method": method, "recovered": result}))


def compress_report(
    runs: list[str], out: str | None = None, device: str = "cpu", rounds: int = 3, new_tokens: int = 128
) -> None:
    """The trade-off table and Pareto plot of a baseline and its compressed variants.

    Args:
        runs: The baseline run first, then the variants (run or checkpoint directories).
        out: Directory for report.md, report.json and pareto.png.
        device: Where speed is measured: cpu, cuda or auto.
        rounds: Alternated rounds of the speed measurements (the median is reported).
        new_tokens: Tokens each batch-1 generation decodes.
    """
    import platform
    import time

    import torch

    from lmforge.api import load_checkpoint
    from lmforge.compress.report import measure, write_report
    from lmforge.runtime import resolve_device

    out = _required(out, "--out DIR")
    dev = resolve_device(device)
    if rounds < 1 or new_tokens < 1:
        raise ConfigError(f"--rounds and --new-tokens must be >= 1, got {rounds} and {new_tokens}")
    variants = measure([Path(r) for r in runs], load_checkpoint, dev, rounds=rounds, new_tokens=new_tokens)
    context = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quality": "fp32, the baseline's validation windows (20 batches of 4)",
        "speed": f"eval: one forward of 4 windows; decode: batch 1, greedy, 32-token prompt, {new_tokens} new "
        f"tokens; median of {rounds} alternated rounds (min-max); each variant computes as lmforge eval and "
        "lmforge generate run it (the compute column)",
    }
    files = write_report(variants, Path(out), context)
    print((Path(out) / "report.md").read_text(), end="")
    print(json.dumps({name: str(path) for name, path in files.items()}))


DISTILL_HELP = (
    "Train a student by distillation: lmforge compress distill --teacher RUN --config FILE --out DIR "
    "[--distill.alpha A --distill.temperature T ...]. The student is the config's model section (any "
    "family or size) on the teacher's tokenizer; see docs/compress.md."
)


FINETUNE_HELP = (
    "Fine-tune a model: lmforge finetune --config FILE --out DIR --init RUN_OR_CHECKPOINT "
    "[--resume [auto] | --resume-from CKPT] [--section.key=value ...]. The model and tokenizer are "
    "those of --init; sections freeze and lora choose what trains (see docs/finetune.md)."
)

PRETRAIN_HELP = (
    "Pretrain a model: lmforge pretrain --config FILE --out DIR [--resume [auto] | --resume-from CKPT] "
    "[--section.key=value ...]. "
    "Sections: model, data, optim, schedule, train, checkpoint, logging, parallel, freeze, lora, "
    "qat, sparsity, distill."
)


class _ConfigFileAction(ActionConfigFile):
    """`--config FILE`: the file's layout is checked first, so that a mistake in it is one line naming
    the file and key (jsonargparse names a file `<unicode string>`, silently drops a section that is
    not a mapping and lets a non-UTF-8 file raise a UnicodeDecodeError)."""

    def __call__(self, parser, cfg, values, option_string=None):
        # Not a file: jsonargparse reads it as an inline YAML string, or says that it does not exist.
        if Path(values).is_file():
            read_config_file(values)
        super().__call__(parser, cfg, values, option_string)


def plan(
    model: str,
    gpus: int,
    gpu: str = "h100-sxm",
    seq: int = 4096,
    global_batch_tokens: str = "4M",
    tokens: str | None = None,
    price: float | None = None,
    dp_replicate: int | None = None,
    dp_shard: int | None = None,
    tp: int | None = None,
    pp: int | None = None,
    micro_batch: int = 1,
    ac: str = "none",
    precision: str = "bf16",
    pp_schedule: str = "1f1b",
    top: int = 15,
    json: bool = False,
    plot: str | None = None,
    hardware: str | None = None,
) -> None:
    """Rank the layouts that train a model on a cluster: memory per GPU, step time, tokens/s, MFU, days, cost.

    Args:
        model: FAMILY:FLAVOR (llama:70b), FAMILY:FLAVOR,key=value,... or FAMILY:key=value,... (a custom shape).
        gpus: Number of GPUs.
        gpu: Device from the catalogue (lmforge/hardware.yaml; --hardware adds more).
        seq: Sequence length in tokens.
        global_batch_tokens: Tokens per optimizer step; k and M are powers of two (4M = 4194304 = 1024 x 4096).
        tokens: Token budget of the whole run (2T), for days, GPU-hours and cost.
        price: Price of one GPU-hour, for the cost.
        dp_replicate: Evaluate one layout: its dp_replicate (default 1).
        dp_shard: Evaluate one layout: its dp_shard (default: the GPUs the other degrees leave).
        tp: Evaluate one layout: its tensor-parallel degree (default 1).
        pp: Evaluate one layout: its pipeline stages (default 1).
        micro_batch: With a single layout: sequences per micro-batch.
        ac: With a single layout: activation checkpointing, none, selective or full.
        precision: With a single layout: bf16 or fp8 matmuls.
        pp_schedule: With a single layout: 1f1b, gpipe or interleaved_1f1b.
        top: Rows of the table.
        json: Print one JSON object per layout instead of the table.
        plot: Write a PNG of memory per GPU and tokens/s across the candidates.
        hardware: A YAML file of more devices (the form of lmforge/hardware.yaml).
    """
    from lmforge.hardware import device
    from lmforge.models import build_model
    from lmforge.plan import planner, report

    if gpus < 1 or seq < 1:
        raise ConfigError(f"--gpus and --seq must be positive, got {gpus} and {seq}")
    cfg = planner.parse_model(model)
    # Batch sizes count in powers of two (4M = 4 x 2^20 tokens); a count that is not a multiple of
    # seq is rounded to the nearest whole number of sequences.
    batch = round(planner.parse_count(global_batch_tokens, "--global-batch-tokens", binary=True) / seq)
    if batch < 1:
        raise ConfigError(
            f"--global-batch-tokens {global_batch_tokens} is less than one sequence of --seq {seq}"
        )
    job = planner.Job(
        cfg,
        device(gpu, hardware),
        gpus,
        seq,
        batch * seq,
        planner.parse_count(tokens, "--tokens") if tokens is not None else None,
        price,
    )
    if top < 1 or (price is not None and price < 0):
        raise ConfigError(f"--top must be at least 1 and --price not negative, got {top} and {price}")
    if seq > cfg.max_seq_len:
        raise ConfigError(f"--seq {seq} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if plot and (Path(plot).is_dir() or not Path(plot).resolve().parent.is_dir()):
        raise ConfigError(f"--plot {plot}: not a file in an existing directory")
    single = any(v is not None for v in (dp_replicate, dp_shard, tp, pp))
    if single:
        degrees = [1 if v is None else v for v in (dp_replicate, tp, pp)]
        if min(degrees) < 1:
            raise ConfigError(f"--dp-replicate, --tp and --pp must be at least 1, got {degrees}")
        rest = degrees[0] * degrees[1] * degrees[2]
        if dp_shard is None and gpus % rest:
            raise ConfigError(f"dp_replicate*tp*pp = {rest} does not divide --gpus {gpus}")
        shard = gpus // rest if dp_shard is None else dp_shard
        layout = planner.Layout(
            degrees[0], shard, degrees[1], degrees[2], micro_batch, ac, precision, pp_schedule
        )
        estimates = planner.plan(job, [layout])
    elif (micro_batch, ac, precision, pp_schedule) != (1, "none", "bf16", "1f1b"):
        raise ConfigError("--micro-batch, --ac, --precision and --pp-schedule describe one layout: give its "
                          "degrees too (--dp-shard, --tp, --pp), or leave them out to rank every candidate")  # fmt: skip
    else:
        estimates = planner.plan(job)
        if not estimates:
            raise ConfigError(f"no layout of {gpus} GPUs divides this model and batch (heads, layers, batch)")
    if json:
        print(report.json_lines(estimates))
    else:
        print(report.header(job, build_model(cfg, "meta").num_params()))
        print(report.table(estimates, top))
    if plot:
        report.plot(estimates, plot, job.device.memory_gib)
    if not any(e.fits for e in estimates):
        smallest = None if single else planner.smallest_fitting_cluster(job)
        raise ConfigError(
            report.smallest_cluster_line(smallest, job) if not single
            else f"layout {estimates[0].layout.describe()} needs {estimates[0].memory_gib_per_gpu:.1f} GiB per GPU; "
            f"{job.device.name} has {job.device.memory_gib:.1f}"
        )  # fmt: skip


def _function_parser(fn, positional: bool = False) -> ArgumentParser:
    parser = ArgumentParser(
        exit_on_error=False, allow_abbrev=False, description=(fn.__doc__ or "").split("\n")[0]
    )
    parser.add_function_arguments(fn, None, as_positional=positional)
    return parser


def _training_parser(description: str) -> ArgumentParser:
    """The parser of `pretrain` and `finetune`: --config, --out, --resume, and every RunConfig key."""
    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False, description=description)
    parser.add_argument("--config", action=_ConfigFileAction, help="Recipe YAML (e.g. recipes/tiny.yaml).")
    parser.add_argument("--out", type=str, required=True, help="Run directory.")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default="no",
        choices=["no", "latest", "auto"],
        help="Continue the run in --out from its newest valid checkpoint (which must exist); "
        "`--resume auto`: from its newest valid checkpoint if it has one, else start it (requeued jobs).",
    )
    parser.add_argument(
        "--resume_from", type=str, help="Continue the run in --out from exactly this checkpoint directory."
    )
    parser.add_class_arguments(RunConfig, None)
    return parser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lmforge",
        exit_on_error=False,
        allow_abbrev=False,
        description="Train language models, end to end.",
    )
    commands = parser.add_subcommands(dest="command")

    commands.add_subcommand(
        "pretrain", _training_parser(PRETRAIN_HELP), help="Pretrain a model from a recipe."
    )
    finetune_parser = _training_parser(FINETUNE_HELP)
    finetune_parser.add_argument(
        "--init", type=str, help="The run directory (its newest checkpoint) or checkpoint to start from."
    )
    commands.add_subcommand(
        "finetune", finetune_parser, help="Fine-tune a trained model (full, frozen, LoRA)."
    )

    commands.add_subcommand(
        "quickstart", _function_parser(quickstart), help="Tiny end-to-end run on stdlib source."
    )
    data_parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    commands.add_subcommand("data", data_parser, help="Data preparation.")  # (jsonargparse: parent first)
    data_commands = data_parser.add_subcommands(dest="data_command")
    data_commands.add_subcommand("prepare", _function_parser(prepare), help="Tokenize a corpus into shards.")
    commands.add_subcommand("generate", _function_parser(generate, positional=True), help="Generate text.")
    commands.add_subcommand(
        "serve", _function_parser(serve, positional=True), help="OpenAI-compatible completions server."
    )
    commands.add_subcommand(
        "eval", _function_parser(evaluate, positional=True), help="Validation loss/perplexity."
    )
    commands.add_subcommand(
        "bench", _function_parser(bench), help="Throughput on random tokens (one JSON line)."
    )
    commands.add_subcommand(
        "export",
        _function_parser(export, positional=True),
        help="One safetensors file, or a Hugging Face directory.",
    )
    commands.add_subcommand(
        "import",
        _function_parser(import_hf, positional=True),
        help="A run from a Hugging Face model directory.",
    )
    commands.add_subcommand(
        "classify",
        _function_parser(classify, positional=True),
        help="Predict classes with a classification run.",
    )
    commands.add_subcommand(
        "plan", _function_parser(plan), help="Memory and throughput of layouts for a model on a cluster."
    )
    compress_parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    commands.add_subcommand(
        "compress", compress_parser, help="Quantize, prune, distill; the trade-off report."
    )
    compress_commands = compress_parser.add_subcommands(dest="compress_command")
    compress_commands.add_subcommand(
        "quantize", _function_parser(compress_quantize, positional=True), help="Quantize a model (torchao)."
    )
    compress_commands.add_subcommand(
        "prune", _function_parser(compress_prune, positional=True), help="Prune a model."
    )
    distill_parser = _training_parser(DISTILL_HELP)
    distill_parser.add_argument("--teacher", type=str, help="The teacher: a run directory or checkpoint.")
    compress_commands.add_subcommand("distill", distill_parser, help="Train a student from a teacher.")
    report_parser = ArgumentParser(
        exit_on_error=False, allow_abbrev=False, description=(compress_report.__doc__ or "").split("\n")[0]
    )
    report_parser.add_argument("runs", nargs="+", help="The baseline run first, then the variants.")
    report_parser.add_argument("--out", type=str, help="Directory for report.md, report.json, pareto.png.")
    report_parser.add_argument(
        "--device", type=str, default="cpu", help="Where speed is measured: cpu, cuda or auto."
    )
    report_parser.add_argument(
        "--rounds", type=int, default=3, help="Alternated rounds of the speed measurements."
    )
    report_parser.add_argument(
        "--new_tokens", type=int, default=128, help="Tokens each batch-1 generation decodes."
    )
    compress_commands.add_subcommand("report", report_parser, help="Trade-off table and plot.")
    return parser


SWITCHES = ("--json", "--chat", "--compile", "--recover-distill")  # boolean options that may be given alone


def _normalize(argv: list[str]) -> list[str]:
    """Accept --max-new-tokens for --max_new_tokens (dotted config keys keep their spelling), and
    a switch alone (`--json`) for `--json=true`."""
    out = []
    for index, arg in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else None
        # A switch followed by another option or by nothing; a value after it is parsed (and checked) as one.
        if arg in SWITCHES and (following is None or following.startswith("-")):
            arg = f"{arg}=true"  # a switch alone: `plan --json`, `generate --chat`
        if arg.startswith("--") and "." not in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = "--" + name[2:].replace("-", "_") + eq + value
        out.append(arg)
    return out


def _resume_mode(argv: list[str]) -> str:
    """The value of `--resume` in argv: no, latest (`--resume` alone) or auto."""
    for index, arg in enumerate(argv):
        if arg.startswith("--resume="):
            return arg.split("=", 1)[1]
        if arg == "--resume":
            following = argv[index + 1] if index + 1 < len(argv) else None
            return following if following in ("no", "latest", "auto") else "latest"
    return "no"


def _resume_config(argv: list[str]) -> list[str]:
    """`pretrain --out DIR --resume [auto]` (or --resume-from) without --config reads DIR/config.yaml
    (overrides still apply). `--resume auto` needs one or the other: on a run that has no config.yaml
    yet it starts the run, which the defaults alone must not do."""
    mode = _resume_mode(argv)
    resuming = mode in ("latest", "auto") or any(a.startswith("--resume_from") for a in argv)
    if (
        argv[:1] not in (["pretrain"], ["finetune"])
        or not resuming
        or any(a.startswith("--config") for a in argv)
    ):
        return argv
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), None)
    if out is None and "--out" in argv and argv.index("--out") + 1 < len(argv):
        out = argv[argv.index("--out") + 1]
    saved = Path(out) / "config.yaml" if out else None
    if saved and saved.is_file():
        return [argv[0], "--config", str(saved), *argv[1:]]
    if mode == "auto":
        raise ConfigError(
            f"--resume auto: {saved or 'the run directory'} does not exist, and without --config the run "
            "would start from the default settings: pass --config with the recipe that starts the run"
        )
    return argv


def _dispatch(parser: ArgumentParser, argv: list[str]) -> None:
    args = parser.parse_args(argv)
    command = args.command
    sub = args[command]
    if command in ("pretrain", "finetune"):
        assert parser._subcommands_action is not None  # noqa: SLF001 - build_parser added the subcommands
        values = parser._subcommands_action._name_parser_map[command].instantiate(sub)  # noqa: SLF001
        if command == "finetune":
            finetune(namespace_to_config(values), values.out, values.init, values.resume, values.resume_from)
        else:
            pretrain(namespace_to_config(values), values.out, values.resume, values.resume_from)
        return
    if command == "data":
        prepare(**sub.prepare.as_dict())
        return
    if command == "compress":
        _dispatch_compress(parser, sub)
        return
    functions: dict[str, Callable[..., object]] = {
        "quickstart": quickstart,
        "generate": generate,
        "serve": serve,
        "eval": evaluate,
        "bench": bench,
        "export": export,
        "import": import_hf,
        "classify": classify,
        "plan": plan,
    }
    kwargs = sub.as_dict()
    kwargs.pop("config", None)
    result = functions[command](**kwargs)
    if command == "bench":
        print(json.dumps(result))


def _dispatch_compress(parser: ArgumentParser, sub) -> None:
    name = sub.compress_command
    if name == "distill":
        assert parser._subcommands_action is not None  # noqa: SLF001 - build_parser added the subcommands
        compress_parser = parser._subcommands_action._name_parser_map["compress"]  # noqa: SLF001
        assert compress_parser._subcommands_action is not None  # noqa: SLF001
        values = compress_parser._subcommands_action._name_parser_map["distill"].instantiate(sub.distill)  # noqa: SLF001
        compress_distill(
            namespace_to_config(values), values.out, values.teacher, values.resume, values.resume_from
        )
        return
    functions: dict[str, Callable[..., object]] = {
        "quantize": compress_quantize,
        "prune": compress_prune,
        "report": compress_report,
    }
    kwargs = sub[name].as_dict()
    kwargs.pop("config", None)
    functions[name](**kwargs)  # report: its parser's keys are the function's arguments too


def compress_distill(
    config: RunConfig, out: str, teacher: str | None, resume: str = "no", resume_from: str | None = None
) -> None:
    """`pretrain` of the config's model with the distill section's teacher (--teacher sets distill.teacher)."""
    from dataclasses import replace

    if teacher is not None:
        config = replace(config, distill=replace(config.distill, teacher=teacher))
    if config.distill.teacher is None:
        raise ConfigError(
            "compress distill needs --teacher RUN_OR_CHECKPOINT: the model the student learns from"
        )
    pretrain(config, out, resume, resume_from)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"lmforge: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line
    # A crash in native code (SIGSEGV, SIGABRT from a C++ std::terminate) prints every thread's
    # Python stack to stderr: the only clue to where it happened, especially on one rank of many.
    with contextlib.suppress(OSError, ValueError):  # stderr is not a file (captured, redirected in-process)
        faulthandler.enable()
    argv = _normalize(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    try:
        _dispatch(parser, _resume_config(argv))
    except LmforgeError as err:
        report(err)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # jsonargparse's ArgumentError and type errors of user values
        if type(err).__module__.startswith(("argparse", "jsonargparse")) or isinstance(err, ConfigError):
            sys.stderr.write(f"lmforge: error: {explain_parse_error(err)}\n")
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
