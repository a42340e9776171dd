"""EleutherAI's lm-evaluation-harness (`lm_eval`) on an lmforge model: `lmforge eval RUN --tasks NAME`.

`HarnessLM` is the harness's model interface over a model and its own tokenizer: the harness turns a
task's documents into string requests and asks for three things, each answered here with the
model's forward pass or with lmforge.infer.generate:

    loglikelihood          log P(continuation | context) summed over the continuation's tokens, and
                           whether greedy decoding would have written exactly that continuation
                           (multiple-choice accuracy compares the choices' sums)
    loglikelihood_rolling  log P(document): every token scored once, in windows of the model's
                           context laid out by the harness's own lm_eval.utils.get_rolling_token_windows
                           (perplexity, bits per byte)
    generate_until         text generated greedily (unless the task's gen_kwargs sample) from the
                           context, cut at the first of the task's `until` strings (exact match)

Scoring requests are batched: sorted by length, right-padded (a causal model never looks right, so
the padding changes no score) and run one forward per batch.

`evaluate_tasks` is the command: it finds the tasks by name among lmforge's own (evaluate/tasks/:
stdlib_mc, stdlib_ppl, stdlib_gen, small YAML tasks over JSONL files shipped with the package),
those of --include-path and the harness's own (which read their datasets from the Hugging Face hub:
a network, or a cached copy). lm-eval reads a task's relative `data_files` from the working
directory; lmforge reads them from the task file's folder, so a task folder works from anywhere.
Importing this module also registers the model with the harness as "lmforge", for its Python API:

    names = ["stdlib_mc"]
    lm_eval.simple_evaluate(model="lmforge", model_args="run=RUN,device=cpu",
                            tasks=load_tasks(task_manager(names), names))
"""

from __future__ import annotations

import contextlib
import difflib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tokenizers import Tokenizer
from tqdm import tqdm

from lmforge.api import load_checkpoint
from lmforge.data.errors import DataError
from lmforge.errors import ConfigError
from lmforge.infer.generate import generate
from lmforge.models import FamilyModel, spec_of
from lmforge.rundir import resolve_checkpoint, run_precision
from lmforge.runtime import PRECISION_NAMES, autocast, resolve_device

# lmforge's own tasks: YAML files and the JSONL data they name (tools/make_eval_tasks.py wrote it).
LOCAL_TASKS = Path(__file__).parent / "evaluate" / "tasks"
# datasets' builders that read local files; any other dataset_path is a dataset on the hub.
LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow")


@register_model("lmforge")
class HarnessLM(TemplateLM):
    """An lmforge model (a causal one) and its tokenizer as lm-eval's `LM`. `dtype` is the autocast
    compute dtype of its forwards (the run's: lmforge.rundir.run_precision)."""

    def __init__(
        self,
        model: FamilyModel,
        tokenizer: Tokenizer,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        if spec_of(model).encoder:
            raise ConfigError(
                f"lm-eval tasks need a causal language model; model family {spec_of(model).name} is an encoder"
            )
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {batch_size}")
        self.model = model
        # A copy: the caller's tokenizer keeps its settings. Text that contains "<|eos|>" stays text,
        # as when the corpus was tokenized for training (lmforge.data.prepare).
        self.tok = Tokenizer.from_str(tokenizer.to_str())
        self.tok.encode_special_tokens = True
        eos_id = tokenizer.token_to_id("<|eos|>")
        if eos_id is None:
            raise ConfigError("the model's tokenizer has no <|eos|> token")
        self.eos_id: int = eos_id
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._device = next(model.parameters()).device

    @classmethod
    def from_run(
        cls, run: str | Path, device: str = "auto", batch_size: int | str | None = None, **_: Any
    ) -> HarnessLM:
        """The newest checkpoint of a run directory (or a checkpoint directory) on `device`."""
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ConfigError(f"batch_size must be a number (lmforge has no 'auto'), got {batch_size!r}")
        dev = resolve_device(device)
        ckpt_dir = resolve_checkpoint(run)
        model, tokenizer = load_checkpoint(ckpt_dir, device=dev)
        return cls(model, tokenizer, run_precision(ckpt_dir, dev), int(batch_size or 8))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> HarnessLM:
        """lm-eval's way to build a registered model: model_args "run=RUN[,device=cpu]"."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> HarnessLM:
        return cls.from_run(
            **{**arg_dict, **{k: v for k, v in (additional_config or {}).items() if v is not None}}
        )

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        # Training joins documents as doc + eos (lmforge.data.prepare): eos is what precedes a
        # document, so it is the one token an empty context stands for.
        return self.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The text's ids, after eos unless add_special_tokens is False: a request's context is the
        start of a document, and in training every document follows an eos (as an empty context
        and each rolling document are conditioned on eos by the harness itself)."""
        ids = self.tok.encode(string, add_special_tokens=False).ids
        return ids if add_special_tokens is False else [self.eos_id, *ids]

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """TemplateLM.loglikelihood's token-level half: ((context, continuation), context ids,
        continuation ids) -> (summed log-prob of the continuation, whether it is the greedy one)."""
        for (_, continuation), _, continuation_ids in requests:
            if len(continuation_ids) > self.max_length:
                raise DataError(
                    f"a continuation of {len(continuation_ids)} tokens is longer than the model's context "
                    f"({self.max_length}): {continuation[:40]!r}"
                )
        pairs = [(context_ids, continuation_ids) for _, context_ids, continuation_ids in requests]
        scored = self.score(pairs, disable_tqdm)
        for (strings, _, _), result in zip(requests, scored, strict=True):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return scored

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log P(text) of each request's text, conditioned on eos alone: the text is cut into windows
        of the model's context that score every token exactly once (the harness's layout: the first
        window reads eos + tokens, each later one the max_length tokens before its first target)."""
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []  # the request each window belongs to
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),  # the windows add eos
                prefix_token=self.eot_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self.score(windows, disable_tqdm), strict=True):
            totals[index] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.no_grad()
    def score(
        self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """(context ids, target ids) -> (sum of log P(target | context), whether every target token
        is the argmax), with the context cut from the left to fit the model's context.

        Longest first, batch_size rows per forward, right-padded: row i reads its own tokens only.
        """
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # an empty target scores 0
        rows = []  # (index, ids the model reads, targets)
        for index, (context, targets) in enumerate(pairs):
            if targets:
                # The model reads everything but the last token; at most max_length of them.
                ids = (context + targets)[-(self.max_length + 1) : -1]
                rows.append((index, ids, targets))
        rows.sort(key=lambda row: -len(row[1]))
        batches = [rows[start : start + self.batch_size] for start in range(0, len(rows), self.batch_size)]
        was_training = self.model.training
        self.model.eval()
        for batch in tqdm(batches, desc="scoring", disable=disable_tqdm):
            width = len(batch[0][1])
            inputs = torch.full((len(batch), width), self.eos_id, dtype=torch.long)  # (B, T)
            for row, (_, ids, _) in enumerate(batch):
                inputs[row, : len(ids)] = torch.tensor(ids)
            with autocast(self._device, self.dtype):
                logits = self.model(inputs.to(self._device))  # (B, T, V)
            sums, greedy = [], []
            for row, (_, ids, targets) in enumerate(batch):
                # The last len(targets) positions of the row predict the targets.
                logprobs = logits[row, len(ids) - len(targets) : len(ids)].float().log_softmax(-1)  # (n, V)
                target = torch.tensor(targets, device=self._device)  # (n,)
                sums.append(logprobs.gather(-1, target[:, None]).sum())
                greedy.append((logprobs.argmax(-1) == target).all())
            # One host sync per batch, not per request.
            for (index, _, _), logprob, is_greedy in zip(
                batch, torch.stack(sums).tolist(), torch.stack(greedy).tolist(), strict=True
            ):
                results[index] = (float(logprob), bool(is_greedy))
        self.model.train(was_training)
        return results

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation of its context, up to (not including) the first `until`
        string, eos, `max_gen_toks` tokens or the model's context. Greedy unless the gen_kwargs say
        do_sample with a temperature > 0."""
        outputs = []
        for request in tqdm(requests, desc="generating", disable=disable_tqdm):
            context, gen_kwargs = request.args
            text = self.generate_text(context, dict(gen_kwargs))
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs

    def generate_text(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 1.0)) if do_sample else 0.0
        top_k, top_p = gen_kwargs.pop("top_k", None), gen_kwargs.pop("top_p", None)
        seed = int(gen_kwargs.pop("seed", 0))  # sampled tasks give the same text on every run
        if gen_kwargs:
            warnings.warn(
                f"generation arguments lmforge does not use: {', '.join(sorted(gen_kwargs))}", stacklevel=2
            )
        # Leave room to generate: a long context keeps its last tokens, at least half the context
        # (or max_new_tokens, if fewer) free for new ones.
        room = min(max_new_tokens, self.max_length // 2)
        prompt = self.tok_encode(context)[-(self.max_length - room) :]
        ids: list[int] = []
        text = ""
        for token_id in generate(
            self.model, prompt, max_new_tokens, temperature, top_k, top_p, seed, self.eos_id, self.dtype
        ):
            if token_id == self.eos_id:
                break
            ids.append(token_id)
            # Decode the whole continuation: a stop string can span tokens, and a byte-level token
            # can end inside a UTF-8 character.
            text = self.tok_decode(ids)
            stops = [text.find(stop) for stop in until if stop and stop in text]
            if stops:
                return text[: min(stops)]
        return text


# ---------------------------------------------------------------------------------- the command


def evaluate_tasks(
    run: str | Path,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
) -> dict:
    """Each task's metrics for the run's newest checkpoint (or a checkpoint directory):
    {"checkpoint", "tasks": {name: {metric: value, "samples": n, "num_fewshot": k}}, "dtype"}.

    limit: the first N documents of each task; num_fewshot: examples put before each question (a
    task that fixes 0, such as a perplexity task, keeps 0).
    """
    tasks = list(dict.fromkeys(tasks))  # each once, in the order given
    if not tasks:
        raise ConfigError("--tasks names no task")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be positive, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    manager = task_manager(tasks, include_path)
    loaded = load_tasks(manager, tasks)  # before the model: a dataset that cannot load costs nothing
    dev = resolve_device(device)
    ckpt_dir = resolve_checkpoint(run)
    model, tokenizer = load_checkpoint(ckpt_dir, device=dev)
    lm = HarnessLM(model, tokenizer, run_precision(ckpt_dir, dev), batch_size)
    # The harness prints progress and notes to stdout; the command's stdout is its one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        results = simple_evaluate(
            model=lm,
            tasks=loaded,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            task_manager=manager,  # without one it would index all the harness's task files again
            log_samples=False,
        )
    assert results is not None  # one process: rank 0 always has the results
    metrics: dict[str, dict[str, Any]] = {}
    for name, values in {**results["results"], **results.get("groups", {})}.items():
        row: dict[str, Any] = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if isinstance(value, int | float) and filter_name:  # not "alias", not an "N/A" stderr
                row[metric if filter_name == "none" else key] = value
        if name in results.get("n-samples", {}):
            row["samples"] = results["n-samples"][name]["effective"]
        if name in results.get("n-shot", {}):
            row["num_fewshot"] = results["n-shot"][name]
        metrics[name] = row
    return {"checkpoint": str(ckpt_dir), "tasks": metrics, "dtype": PRECISION_NAMES[lm.dtype]}


def task_manager(names: Sequence[str], include_path: str | Path | None = None) -> TaskManager:
    """A TaskManager that knows every name in `names`: lmforge's tasks and --include-path's alone
    when they are enough (indexing the harness's ~15k task files takes seconds); ConfigError for
    an unknown name, with the names that come closest."""
    paths = [LOCAL_TASKS]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include-path {include_path} is not a directory")
        paths.append(Path(include_path))
    manager = TaskManager(include_path=paths, include_defaults=False)
    local = set(manager.all_tasks)
    if set(names) <= local:
        return manager
    manager = TaskManager(include_path=paths)  # with the harness's own tasks (hub datasets)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        raise ConfigError(
            f"unknown task {', '.join(map(repr, unknown))}"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f": lmforge's and --include-path's tasks are {', '.join(sorted(local))}; lm-eval has "
            f"{len(manager.all_tasks) - len(local)} more (`lm-eval ls tasks` lists them)"
        )
    return manager


def load_tasks(manager: TaskManager, names: Sequence[str]) -> list:
    """The Task and Group objects of `names`, their datasets read (and downloaded, for the hub's).

    A task of lmforge's or of --include-path is built from its YAML with relative data_files read
    from the YAML's folder; any failure to build one is a DataError naming the task.
    """
    loaded: list = []
    for name in names:
        entry = manager.task_index[name]
        spec: str | dict = name
        if name in manager.all_subtasks and entry.yaml_path is not None and _is_local(entry.yaml_path):
            spec = _config_with_local_data(entry.yaml_path)
        try:
            built = manager.load([spec])
        except Exception as err:  # the harness and datasets raise many kinds; the user gets one line
            dataset = (entry.cfg or {}).get("dataset_path")
            where = (
                f" (its dataset {dataset} is on the Hugging Face hub: that needs a network, or a copy in "
                "the datasets cache and HF_DATASETS_OFFLINE=1)"
                if dataset and dataset not in LOCAL_BUILDERS and not Path(str(dataset)).exists()
                else ""
            )
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise DataError(f"task {name}: cannot load it: {type(err).__name__}: {message}{where}") from None
        groups = built.get("groups", {})
        loaded.extend([groups[name]] if name in groups else built["tasks"].values())
    return loaded


def _is_local(yaml_path: Path) -> bool:
    """Whether a task file is lmforge's or the user's, not one of the harness's own."""
    import lm_eval.tasks

    return not yaml_path.resolve().is_relative_to(Path(lm_eval.tasks.__file__).parent.resolve())


def _config_with_local_data(yaml_path: Path) -> dict:
    """The task's full config (its includes merged, its !function references imported, as lm-eval
    reads it) with relative data_files and data_dir made absolute from the YAML's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager itself uses

    config = load_yaml(yaml_path, resolve_func=True)
    dataset_kwargs = dict(config.get("dataset_kwargs") or {})

    def absolute(path: Any) -> Any:
        if isinstance(path, list):
            return [absolute(p) for p in path]
        if isinstance(path, dict):
            return {split: absolute(p) for split, p in path.items()}
        if isinstance(path, str) and "://" not in path and not Path(path).expanduser().is_absolute():
            return str(yaml_path.parent / path)
        return path

    for key in ("data_files", "data_dir"):
        if key in dataset_kwargs:
            dataset_kwargs[key] = absolute(dataset_kwargs[key])
    if dataset_kwargs:
        config["dataset_kwargs"] = dataset_kwargs
    return config
