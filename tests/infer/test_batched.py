"""Batched generation: rows of different lengths in one KV cache, each at its own positions.

Greedy rows must equal each prompt generated alone, decode-step logits must equal a full forward
without a cache, a row prefilled while others decode (continuous batching) must not notice them,
and rows end on their own (eos, budget, stop strings: cut exactly).
"""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.generate import (
    DecodeBatch,
    SamplingParams,
    completion_of,
    generate,
    generate_batch,
    generate_batch_detailed,
)

FAMILIES = ["llama", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_rows_equal_each_prompt_alone(family, sharp_model, random_prompts):
    model = sharp_model(family)
    # The debug context is 64: the 40-token prompt has room for 24 new tokens only, as alone.
    prompts = random_prompts([3, 17, 1, 9, 40])
    alone = [list(generate(model, p, 30, temperature=0)) for p in prompts]
    assert [len(a) for a in alone] == [30, 30, 30, 30, 24]
    assert len({tuple(a) for a in alone}) == 5 and min(len(set(a)) for a in alone) > 8  # not vacuous
    assert generate_batch(model, prompts, SamplingParams(max_new_tokens=30, temperature=0)) == alone

    # An eos that row 1 reaches at its 7th token ends that row there (eos included); the others
    # go on, each to its own eos or budget, also when the host looks at every step.
    eos = alone[1][6]
    alone_eos = [list(generate(model, p, 30, temperature=0, eos_id=eos)) for p in prompts]
    assert len(alone_eos[1]) == alone[1].index(eos) + 1 <= 7 and max(map(len, alone_eos)) > 7
    params = SamplingParams(max_new_tokens=30, temperature=0)
    for check_every in (1, 16):
        generations = generate_batch_detailed(model, prompts, params, eos_id=eos, check_every=check_every)
        assert [g.token_ids for g in generations] == alone_eos
        assert [g.finish_reason for g in generations] == [
            "eos" if a[-1] == eos else "length" for a in alone_eos
        ]


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_at_per_row_positions_equal_the_full_forward(family, sharp_model, random_prompts):
    """Cached decoding of rows at different positions = recomputing each whole sequence."""
    model = sharp_model(family)
    prompts = random_prompts([5, 12, 2], seed=1)
    sequences = [list(p) for p in prompts]
    cached = []
    with DecodeBatch(model, 3, 24) as batch:
        logits = torch.cat([batch.prefill_row(row, p) for row, p in enumerate(prompts)])  # (3, V)
        for _ in range(8):
            tokens = logits.argmax(dim=-1, keepdim=True)  # (3, 1)
            for row, token in enumerate(tokens[:, 0].tolist()):
                sequences[row].append(token)
            logits = batch.decode_step(tokens)
            cached.append(logits)
        assert batch.lengths.tolist() == [len(p) + 8 for p in prompts]
    with torch.no_grad():
        for row, sequence in enumerate(sequences):
            full = model(torch.tensor([sequence]))[0]  # (T, V), no cache
            for step in range(8):
                position = len(prompts[row]) + step  # the token fed at this step
                torch.testing.assert_close(cached[step][row], full[position], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_row_prefilled_while_others_decode_equals_it_alone(family, sharp_model, random_prompts):
    """Continuous batching on two rows: a request joins a free row between decode steps, and
    another takes the row of one that finished. Each equals its generation alone."""
    model = sharp_model(family)
    requests = dict(zip("abc", random_prompts([6, 11, 3], seed=2), strict=True))
    want = {name: list(generate(model, p, 10, temperature=0)) for name, p in requests.items()}
    got: dict[str, list[int]] = {name: [] for name in requests}
    waiting = ["b", "c"]
    with DecodeBatch(model, 2, 32) as batch:
        rows = {0: "a"}  # row -> request
        logits = torch.zeros(2, model.cfg.vocab_size)
        logits[0] = batch.prefill_row(0, requests["a"])[0]
        for step in range(40):
            tokens = logits.argmax(dim=-1, keepdim=True)  # (2, 1); a free row's token is ignored
            for row, name in rows.items():
                got[name].append(int(tokens[row]))
            rows = {row: name for row, name in rows.items() if len(got[name]) < 10}
            active = torch.tensor([row in rows for row in range(2)])
            logits = batch.decode_step(tokens, active)
            # Admit a waiting request into a free row: "b" at step 3, "c" once "a" has finished.
            for row in range(2):
                if row not in rows and waiting and step >= 3:
                    rows[row] = name = waiting.pop(0)
                    logits[row] = batch.prefill_row(row, requests[name])[0]
            if not rows:
                break
        # A finished row's length stopped where it ended: its prompt and the tokens fed after it.
        assert batch.lengths.tolist() == [len(requests["c"]) + 9, len(requests["b"]) + 9]
    assert got == want


def test_stop_strings_cut_each_row_exactly(sharp_model, random_prompts):
    """A row ends at the token that completes its stop string; its text ends just before it. A stop
    string split over tokens, and a row without one, which runs to its budget."""
    pieces = [chr(ord("a") + i % 26) * (1 + i % 3) for i in range(512)]  # id -> 1 to 3 letters

    class Letters:
        def decode(self, ids: list[int]) -> str:
            return "".join(pieces[i] for i in ids)

    tokenizer = Letters()
    model = sharp_model("llama")
    prompts = random_prompts([4, 9], seed=3)
    alone = [list(generate(model, p, 24, temperature=0)) for p in prompts]
    text = tokenizer.decode(alone[0])
    # Stop at the last piece of token 10 and the first letter of token 11: it spans two tokens.
    start = len(tokenizer.decode(alone[0][:10])) - 1
    stop = text[start : start + 2]
    first = text.index(stop)  # maybe earlier than `start`: the cut is at the first occurrence
    assert stop not in tokenizer.decode(alone[1])  # (else pick another seed) row 1 never stops
    n_tokens = next(n for n in range(1, 25) if stop in tokenizer.decode(alone[0][:n]))

    params = SamplingParams(max_new_tokens=24, temperature=0, stop=(stop,))
    generations = generate_batch_detailed(model, prompts, params, tokenizer=tokenizer)
    assert generations[0].token_ids == alone[0][:n_tokens] and generations[0].finish_reason == "stop"
    assert generations[1].token_ids == alone[1] and generations[1].finish_reason == "length"
    completion = completion_of(generations[0], tokenizer.decode, params.stop, eos_id=None)
    assert completion.text == text[:first]
    with pytest.raises(ValueError, match="tokenizer"):
        generate_batch(model, prompts, params)


def test_seeded_sampling_reproduces_and_the_seed_matters(sharp_model, random_prompts):
    model = sharp_model("gpt2")
    prompts = random_prompts([3, 8, 5], seed=4)

    def run(seed: int) -> list[list[int]]:
        return generate_batch(model, prompts, SamplingParams(max_new_tokens=16, top_k=20, seed=seed))

    first = run(seed=1)
    assert run(seed=1) == first
    assert run(seed=2) != first
    assert all(len(row) == 16 for row in first)


def test_the_decode_step_traces_as_one_graph_and_compiled_rows_equal_eager(
    sharp_model, random_prompts, monkeypatch
):
    """`compile=True` with dynamo's eager backend (no inductor codegen, which takes minutes on a CPU
    runner; benchmarks/generate_bench.py checks inductor's tokens against eager ones): the decode step
    traces whole (fullgraph: a graph break would raise) and gives the eager tokens, in a cache whose
    length was rounded up to a power of two."""
    import lmforge.infer.generate as generate_module

    traced = []

    def eager_backend(device_type: str, fullgraph: bool = True):
        assert fullgraph  # a plain model: a graph break would be an error

        def count(graph_module, example_inputs):
            traced.append(graph_module)
            return graph_module.forward

        return torch.compile(generate_module.decode_one_token, backend=count, fullgraph=True, dynamic=False)

    monkeypatch.setattr(generate_module, "compiled_decode_one_token", eager_backend)
    monkeypatch.setattr(generate_module, "ahead_of_time_step", lambda device_type: None)  # dynamo's call
    model = sharp_model("llama")
    prompts = random_prompts([3, 11, 6], seed=5)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert generate_batch(model, prompts, params, compile=True) == generate_batch(model, prompts, params)
    assert (
        list(generate(model, prompts[1], 12, temperature=0, compile=True))
        == generate_batch(model, prompts[1:2], params)[0]
    )
    assert len(traced) == 2  # one graph per shape: 3 rows, then 1 (both caches: 11 + 12 slots, made 32)


def test_ahead_of_time_steps_give_the_eager_tokens_one_per_set_of_guards(sharp_model, random_prompts,
                                                                        monkeypatch):  # fmt: skip
    """The compiled step as dynamo's ahead-of-time functions (AheadOfTimeStep; dynamo's eager backend,
    as above): the eager tokens; one function per shape, picked again by its guards for a later batch
    of that shape, other prompts and another model's weights included (the function reads the
    model's weights and caches at each call); none under inductor's freezing (tensors baked in); a
    torch without `aot_compile`, or one where it fails, decodes through the compiled function."""
    import lmforge.infer.generate as generate_module
    from lmforge.infer.generate import AheadOfTimeStep, decode_one_token

    compiled = torch.compile(decode_one_token, backend="eager", fullgraph=True, dynamic=False)
    monkeypatch.setattr(
        generate_module, "compiled_decode_one_token", lambda device_type, fullgraph=True: compiled
    )
    step = AheadOfTimeStep(compiled)
    monkeypatch.setattr(generate_module, "ahead_of_time_step", lambda device_type: step)
    model, other_model = sharp_model("llama"), sharp_model("llama", seed=2)
    prompts, other_prompts = random_prompts([3, 11, 6], seed=5), random_prompts([3, 11, 6], seed=6)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    eager = generate_batch(model, prompts, params)
    assert generate_batch(model, prompts, params, compile=True) == eager
    assert len(step.functions) == 1
    assert list(generate(model, prompts[1], 12, temperature=0, compile=True)) == eager[1]
    assert len(step.functions) == 2  # batch 1: other guards
    assert generate_batch(model, other_prompts, params, compile=True) == generate_batch(
        model, other_prompts, params
    )
    other_eager = generate_batch(other_model, prompts, params)
    assert other_eager != eager
    assert generate_batch(other_model, prompts, params, compile=True) == other_eager
    assert len(step.functions) == 2  # batches of 3 again: their function passes the guards
    with torch._inductor.config.patch(freezing=True):
        assert (
            step.function_for(model, torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long))
            is None
        )
        assert generate_batch(model, prompts, params, compile=True) == eager  # through dynamo's hook

    def failing(*args, **kwargs):
        raise RuntimeError("no ahead-of-time compilation here")

    without = AheadOfTimeStep(compiled)
    monkeypatch.setattr(without.compiled, "aot_compile", failing, raising=False)
    monkeypatch.setattr(generate_module, "ahead_of_time_step", lambda device_type: without)
    with pytest.warns(UserWarning, match="RuntimeError: no ahead-of-time compilation here"):
        assert generate_batch(model, prompts, params, compile=True) == eager
    assert without.functions == [] and not without.available


@pytest.mark.parametrize("n_rep", [1, 2, 12])
@pytest.mark.parametrize("batched_positions", [False, True])
def test_compiled_cache_attention_is_sdpa(batched_positions, n_rep):
    """Inside a compiled step on a CPU the attention over the cache is written out (scores, masked
    softmax, weighted sum: lmforge.models.kv_cache.attend_cache); it gives PyTorch's attention,
    for one position for every row and for each row's own (a (B, 1, Tq, S) mask), and with the
    query heads of a key/value head laid out as n_rep rows (grouped-query attention): written as
    products and sums for a decode step's few query rows, as matmuls for more (12)."""
    from lmforge.models.kv_cache import KVCache, attend_cache

    torch.manual_seed(0)
    cache = KVCache(batch_size=2, max_seq_len=16, n_kv_heads=2, head_dim=8)
    positions = torch.tensor([[5], [11]]) if batched_positions else torch.tensor([7])
    mask = cache.causal_mask(positions, n_rep)
    q, k, v = torch.randn(2, 2, n_rep, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    compiled = torch.compile(attend_cache, backend="eager", fullgraph=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(compiled(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attend_cache(q, k, v, mask), expected, rtol=0, atol=0)  # eager: SDPA


def test_guards_are_skipped_only_after_a_whole_graph_step_at_the_default_stance(sharp_model):
    """DecodeBatch._guards: every compiled step of a batch after its first skips dynamo's guards,
    unless the step is not one whole graph, the batch starts again, or the caller set a stance;
    the stance is restored after the step."""
    from torch._dynamo import eval_frame

    def skips(batch: DecodeBatch) -> bool:
        with batch._guards():
            return eval_frame._stance.skip_guard_eval_unsafe

    model = sharp_model("llama")
    batch = DecodeBatch(model, 1, 16, compile=True)
    with batch:
        assert not skips(batch)  # the first step checks them
        batch._guards_checked = True
        assert skips(batch)
        assert not eval_frame._stance.skip_guard_eval_unsafe  # restored
        with torch.compiler.set_stance("force_eager"):
            assert not skips(batch)
    with batch:  # entered again: new caches, guards checked again
        assert not skips(batch)
    batch._guards_checked, batch._whole_graph = True, False  # a graph that breaks
    assert not skips(batch)
    eager = DecodeBatch(model, 1, 16)
    eager._guards_checked = True
    assert not skips(eager)
