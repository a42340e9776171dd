"""lm-evaluation-harness on a debug model (lmforge.harness): each kind of request against the same
numbers computed directly with the model, and `lmforge eval RUN --tasks` on the tasks lmforge ships,
offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub: the tasks here read local files only. Set before the tests import datasets (it reads
    these once, at import), with its cache in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, session_debug_config) -> Path:
    """A debug llama (context 64) trained 4 steps on the test corpus."""
    from lmforge.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("harness") / "run"
    quiet = {"progress": False, "tensorboard": False, "plot": False}
    pretrain(
        session_debug_config(train={"max_steps": 4, "eval_every": 0, "sample_tokens": 0}, logging=quiet), out
    )
    return out


@pytest.fixture(scope="module")
def lm(run):
    """The adapter, 3 rows per forward: the requests below fill several batches of mixed lengths."""
    from lmforge.api import load
    from lmforge.harness import HarnessLM

    model, tokenizer = load(run)
    return HarnessLM(model, tokenizer, batch_size=3)


def request(kind: str, *args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log P(ids[i + 1] | ids[: i + 1]) for each i: one unpadded forward of the whole sequence."""
    logits = model(torch.tensor([ids[:-1]]))[0].float()  # (T, V)
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]  # (T,)


# Real text of every length needed below: the documents of lmforge's perplexity task (committed).
TASKS = Path(lmforge.__file__).parent / "evaluate" / "tasks"
TEXT = "".join(json.loads(line)["text"] for line in (TASKS / "stdlib_ppl.jsonl").read_text().splitlines())


def test_loglikelihood_is_the_summed_log_softmax_of_the_continuation(lm):
    tok, eos = lm.tok, lm.eot_token_id
    pairs = [(TEXT[:40], TEXT[40:70]), (TEXT[:200], TEXT[200:230]), ("import", " torch"), ("", "def f():"),
             ("def f(x):\n    return", " x"), (TEXT[:90], TEXT[90:150]), (TEXT[300:2000], TEXT[2000:2030])]  # fmt: skip
    results = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    assert len(results) == len(pairs)
    for (context, continuation), (logprob, _) in zip(pairs, results, strict=True):
        # The harness's convention: whitespace that ends the context starts the continuation, and
        # the continuation's tokens are those of context + continuation after the context's own
        # (where the two texts' tokens merge across the cut, the model reads the context's).
        context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation
        context_ids = tok.encode(context).ids
        continuation_ids = tok.encode(context + continuation).ids[len(context_ids) :]
        assert continuation_ids
        # The context follows eos, as a document does in training (an empty one is eos alone); a
        # context longer than the model's window keeps its last tokens.
        ids = [eos, *context_ids, *continuation_ids][-(lm.max_length + 1) :]
        expected = direct_logprobs(lm.model, ids)[-len(continuation_ids) :].sum().item()
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4), (context[-20:], continuation)

    # is_greedy: true for the model's own argmax continuation, false once one token differs.
    context = tok.encode(TEXT[:50]).ids
    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(5):
            greedy.append(int(lm.model(torch.tensor([context + greedy]))[0, -1].argmax()))
    other = [*greedy[:-1], (greedy[-1] + 1) % lm.model.cfg.vocab_size]
    (ll_greedy, is_greedy), (ll_other, is_other) = lm._loglikelihood_tokens(
        [(("", ""), context, greedy), (("", ""), context, other)]
    )
    assert is_greedy and not is_other
    assert ll_greedy > ll_other


def test_rolling_loglikelihood_scores_every_token_once_in_windows_of_the_context(lm):
    tok, eos, width = lm.tok, lm.eot_token_id, lm.max_length
    docs = [TEXT[:1000], TEXT[1000:1100], TEXT[2000:2003]]
    # The first spans several windows and ends in a part of one.
    assert len(tok.encode(docs[0]).ids) > 3 * width and len(tok.encode(docs[0]).ids) % width
    results = lm.loglikelihood_rolling([request("loglikelihood_rolling", doc) for doc in docs])
    for doc, total in zip(docs, results, strict=True):
        tokens = tok.encode(doc).ids
        sequence = [eos, *tokens]  # eos stands before the document
        expected = 0.0
        # Targets tokens[start : start + width], each window reading the `width` tokens before its
        # last target: windows that do not overlap, but for the last, which reads a full context.
        for start in range(0, len(tokens), width):
            end = min(start + width, len(tokens))
            window = sequence[max(0, end - width) : end + 1]
            expected += direct_logprobs(lm.model, window)[-(end - start) :].sum().item()
        assert total == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_generate_until_cuts_at_the_first_stop_string(lm):
    from lmforge.infer.generate import generate

    context = TEXT[:60]
    ids = list(generate(lm.model, lm.tok_encode(context), 24, temperature=0.0, eos_id=lm.eot_token_id))
    text = lm.tok_decode(ids)  # the greedy continuation, uncut
    stop = text[6:8]
    assert stop and text.find(stop) < len(text) - 2
    outputs = lm.generate_until(
        [
            request("generate_until", context, {"until": [stop, "\x00never"], "max_gen_toks": 24}),
            request("generate_until", context, {"until": ["\x00never"], "max_gen_toks": 5}),
            request("generate_until", context, {"until": stop, "max_gen_toks": 24, "do_sample": False}),
        ]
    )
    assert outputs[0] == text[: text.find(stop)]
    assert outputs[1] == lm.tok_decode(ids[:5])  # max_gen_toks tokens, no stop string met
    assert outputs[2] == outputs[0]


def test_eval_tasks_prints_each_tasks_metrics(run, lm, tmp_path, capsys, monkeypatch):
    from lmforge.harness import LOCAL_TASKS

    assert LOCAL_TASKS == TASKS
    # A task of the user's, its data_files relative to its YAML, run from another folder.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rows.jsonl").write_text('{"q": "import", "a": " os"}\n{"q": "def", "a": " f():"}\n')
    (tasks / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs: {data_files: {test: rows.jsonl}}\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\ntarget_delimiter: ''\n"
        "metric_list: [{metric: perplexity, aggregation: perplexity, higher_is_better: false}]\n"
    )
    monkeypatch.chdir(tmp_path)
    options = ["--include-path", str(tasks), "--limit", "10"]
    assert main(["eval", str(run), "--tasks", "stdlib_mc,stdlib_ppl,mine", *options]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])["tasks"]

    mc, ppl = result["stdlib_mc"], result["stdlib_ppl"]
    assert mc["samples"] == ppl["samples"] == 10 and result["mine"]["samples"] == 2
    # acc: the share of the first 10 rows whose right choice has the highest log-likelihood.
    rows = [json.loads(line) for line in (LOCAL_TASKS / "stdlib_mc.jsonl").read_text().splitlines()[:10]]
    right = 0
    for row in rows:
        scores = lm.loglikelihood([request("loglikelihood", row["context"], c) for c in row["choices"]])
        right += max(range(4), key=lambda i: scores[i][0]) == row["label"]
    assert mc["acc"] == pytest.approx(right / 10)
    assert 0 <= mc["acc_norm"] <= 1
    # Perplexity metrics of the first 10 documents, from their summed rolling log-likelihood.
    docs = [
        json.loads(line)["text"] for line in (LOCAL_TASKS / "stdlib_ppl.jsonl").read_text().splitlines()[:10]
    ]
    total = sum(lm.loglikelihood_rolling([request("loglikelihood_rolling", d) for d in docs]))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert ppl["bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)
    assert ppl["byte_perplexity"] == pytest.approx(2 ** ppl["bits_per_byte"], rel=1e-6)
    assert ppl["word_perplexity"] > ppl["byte_perplexity"] > 1  # a word spans bytes
    # The user's task: perplexity is exp of minus the mean log-likelihood of its two answers.
    answers = lm.loglikelihood(
        [request("loglikelihood", "import", " os"), request("loglikelihood", "def", " f():")]
    )
    assert result["mine"]["perplexity"] == pytest.approx(
        math.exp(-(answers[0][0] + answers[1][0]) / 2), rel=1e-5
    )


def test_an_unknown_task_is_one_error_line(run, capsys):
    assert main(["eval", str(run), "--tasks", "stdlib_mc,no_such_task"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: unknown task 'no_such_task'"), err
    assert "stdlib_mc" in err[0] and "stdlib_ppl" in err[0]  # what lmforge has
