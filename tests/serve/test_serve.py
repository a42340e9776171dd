"""`lmforge serve`: one real server process on 127.0.0.1 (a sharp debug model, 4 rows), driven with
httpx and the openai client.

Every completion is checked against the same prompt generated alone by lmforge.infer.generate's
one-sequence path: whole and streamed, through the openai client, and under concurrency (more
clients than rows: requests wait, join the batch mid-flight, leave it at different steps). Bad
requests get 4xx errors in OpenAI's shape and the server goes on serving; a client that goes away
mid-stream frees its row; SIGTERM ends the server with exit code 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest

from lmforge.data.sft import CHAT_TOKENS, render

EOS = "<|eos|>"


def stream_payloads(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def joined(payloads: list[str], chat: bool = False) -> tuple[str, str | None, dict | None]:
    """A stream's text, finish_reason and usage; checks that it ends with [DONE] and that exactly
    one chunk (the last with choices) carries a finish_reason."""
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    with_choices = [c for c in chunks if c["choices"]]
    reasons = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert all(r is None for r in reasons[:-1]) and reasons[-1] in ("stop", "length")
    assert len({c["id"] for c in chunks}) == 1
    if chat:
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in with_choices)
    else:
        text = "".join(c["choices"][0]["text"] for c in with_choices)
    usage = next((c["usage"] for c in chunks if c.get("usage")), None)
    return text, reasons[-1], usage


def health(server) -> dict:
    return httpx.get(f"{server.url}/health").json()


def test_the_server_names_its_model_and_is_healthy(server, sharp_run):
    assert f"sharp-chat at {server.url}/v1 (max batch {server.max_batch}" in server.ready_line
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["sharp-chat"] and models["object"] == "list"
    state = health(server)
    assert state["status"] == "ok" and state["max_batch"] == server.max_batch and state["active"] == 0


def test_a_completion_whole_and_streamed_is_the_prompts_alone(server, reference):
    prompt = "def parse_args(argv):\n    "
    ids = reference.tokenizer.encode(prompt).ids
    eos = {reference.tokenizer.token_to_id(EOS)}
    want, n_tokens, reason = reference(ids, 40, eos, temperature=0)
    assert len(want) > 20  # not vacuous: many tokens of text
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0}

    whole = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()
    assert whole["object"] == "text_completion" and whole["model"] == "sharp-chat"
    assert whole["choices"][0]["text"] == want
    assert whole["choices"][0]["finish_reason"] == reason
    assert whole["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n_tokens,
                              "total_tokens": len(ids) + n_tokens}  # fmt: skip

    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=streamed, timeout=30) as response:
        payloads = stream_payloads(response)
    assert len(payloads) > 5  # the text came in pieces
    text, finish_reason, usage = joined(payloads)
    assert (text, finish_reason, usage) == (want, reason, whole["usage"])


def test_the_openai_client_completes_and_chats(server, reference):
    tokenizer = reference.tokenizer
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    prompt = "import os\n"
    want, _, _ = reference(tokenizer.encode(prompt).ids, 30, {tokenizer.token_to_id(EOS)}, temperature=0)
    completion = client.completions.create(model="sharp-chat", prompt=prompt, max_tokens=30, temperature=0)
    assert completion.choices[0].text == want and completion.usage is not None
    stream = client.completions.create(
        model="sharp-chat", prompt=prompt, max_tokens=30, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    ids = render(messages, tokenizer, generation_prompt=True)[0]
    ends = {tokenizer.token_to_id(t) for t in (EOS, CHAT_TOKENS[1])}
    want_chat, n_tokens, reason = reference(ids, 25, ends, temperature=0)
    assert want_chat
    chat = client.chat.completions.create(
        model="sharp-chat",
        messages=messages,
        max_tokens=25,
        temperature=0,  # type: ignore[arg-type]
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (want_chat, reason)
    assert chat.usage is not None and chat.usage.completion_tokens == n_tokens
    chunks = client.chat.completions.create(
        model="sharp-chat",
        messages=messages,
        max_tokens=25,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


def test_concurrent_requests_each_get_what_they_get_alone(server, reference):
    """8 clients at once on 4 rows: greedy, seeded sampling, a repetition penalty, a stop string and
    a prompt at the end of the context, streamed and not; each equals its prompt generated alone."""
    tokenizer = reference.tokenizer
    eos = {tokenizer.token_to_id(EOS)}
    context = reference.model.cfg.max_seq_len
    per_line = len(tokenizer.encode("value = 1\n" * 10).ids) // 10
    long_prompt = "value = 1\n" * ((context - 20) // per_line)
    n_long = len(tokenizer.encode(long_prompt).ids)
    assert context - 60 < n_long < context - 5, n_long  # the context ends before max_tokens
    cases = [
        ("def main(", {"max_tokens": 50, "temperature": 0}),
        ("class Parser:\n", {"max_tokens": 9, "temperature": 0}),
        ("x", {"max_tokens": 60, "temperature": 0}),
        ("import json\nimport sys\n\n", {"max_tokens": 25, "temperature": 0.9, "top_k": 40, "seed": 7}),
        ("for i in range(10):", {"max_tokens": 35, "temperature": 0.7, "top_p": 0.9, "seed": 3}),
        ("return self.", {"max_tokens": 30, "temperature": 0, "repetition_penalty": 1.3}),
        ("while True:\n", {"max_tokens": 60, "temperature": 0}),  # + a stop string, below
        (long_prompt, {"max_tokens": 60, "temperature": 0}),
    ]
    expected = []
    for prompt, options in cases:
        ids = tokenizer.encode(prompt).ids
        sampling = {
            k: options[k]
            for k in ("temperature", "top_k", "top_p", "seed", "repetition_penalty")
            if k in options
        }
        if prompt == "while True:\n":  # stop at a piece of its own text, some tokens in
            free_text = reference(ids, options["max_tokens"], eos, **sampling)[0]
            options["stop"] = [free_text[20:23], "never appears \x00"]
        expected.append(
            reference(ids, options["max_tokens"], eos, tuple(options.get("stop", ())), **sampling)
        )
    assert expected[6][2] == "stop" and expected[7][1] == context - n_long < 60  # the cases bite
    assert len({text for text, _, _ in expected}) == len(cases)

    async def one(client: httpx.AsyncClient, index: int) -> tuple[str, int, str]:
        prompt, options = cases[index]
        body = {"prompt": prompt, **options}
        if index % 2:  # odd clients stream
            body.update(stream=True, stream_options={"include_usage": True})
            async with client.stream("POST", "/v1/completions", json=body) as response:
                payloads = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
            text, reason, usage = joined(payloads)
            assert usage is not None
            return text, usage["completion_tokens"], reason
        result = (await client.post("/v1/completions", json=body)).json()
        return (
            result["choices"][0]["text"],
            result["usage"]["completion_tokens"],
            result["choices"][0]["finish_reason"],
        )

    async def all_at_once() -> list[tuple[str, int, str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(cases))))

    before = health(server)
    got = asyncio.run(all_at_once())
    after = health(server)
    for index, (result, want) in enumerate(zip(got, expected, strict=True)):
        assert result == want, f"case {index}: {cases[index][0][:30]!r}"
    assert after["admitted"] - before["admitted"] == len(cases)
    # Batched: the rows shared decode steps (one request at a time would take one step per token).
    tokens = after["completion_tokens"] - before["completion_tokens"]
    assert tokens == sum(n for _, n, _ in expected)
    assert after["decode_steps"] - before["decode_steps"] < tokens / 2


BAD_REQUESTS = [
    # (what, path, body, status, param)
    ("missing prompt", "/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("a string for a number", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("a number for the prompt", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("negative temperature", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("not JSON", "/v1/completions", b"{'prompt': 'x'}", 400, None),
    ("an empty body", "/v1/completions", b"", 400, None),
    ("not an object", "/v1/completions", [1, 2], 400, None),
    ("longer than the context", "/v1/completions", {"prompt": "value = 1\n" * 2000}, 400, "prompt"),
    ("n > 1", "/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("logprobs", "/v1/completions", {"prompt": "x", "logprobs": 1}, 400, "logprobs"),
    ("echo", "/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("an empty stop string", "/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("another model", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    (
        "an unknown role",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages",
    ),
    ("an unknown route", "/v1/embeddings", {"input": "x"}, 404, None),
]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for what, path, body, status, param in BAD_REQUESTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = client.post(path, content=content, headers={"content-type": "application/json"})
            assert response.status_code == status, (what, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], what
            assert (error["type"], error["param"]) == ("invalid_request_error", param), (what, error)
        too_long = client.post("/v1/completions", json=BAD_REQUESTS[8][2]).json()["error"]
        assert (
            "context is 1024 tokens" in too_long["message"] and too_long["code"] == "context_length_exceeded"
        )
        # curl -d sends a form's Content-Type: the JSON is read all the same.
        good = client.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 3}',
                           headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 3
    assert server.process.poll() is None


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    """Every row is taken by a long generation (ignore_eos, 1000 tokens: seconds); each client reads
    its first chunk and goes away. The engine must cancel all four at once, not finish them; then
    the same for a client that stops waiting for a whole completion."""
    before = health(server)
    body = {"prompt": "x", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
    clients = [httpx.Client(base_url=server.url, timeout=30) for _ in range(server.max_batch)]
    streams = [client.stream("POST", "/v1/completions", json=body) for client in clients]
    lines = [stream.__enter__().iter_lines() for stream in streams]  # (kept: closing one disconnects)
    assert all(next(line).startswith("data: ") for line in lines)
    assert health(server)["active"] == server.max_batch
    for stream, client in zip(streams, clients, strict=True):
        stream.__exit__(None, None, None)
        client.close()
    deadline = time.monotonic() + 10
    while (state := health(server))["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["active"] == 0
    assert state["finished"]["cancelled"] - before["finished"]["cancelled"] == server.max_batch
    assert state["completion_tokens"] - before["completion_tokens"] < server.max_batch * 1000 / 2
    # A client that gives up waiting for a whole (not streamed) completion frees its row too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
    deadline = time.monotonic() + 10
    while (state := health(server))["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["finished"]["cancelled"] - before["finished"]["cancelled"] == server.max_batch + 1
    assert state["finished"]["length"] == before["finished"]["length"]
    after = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=30)
    assert after.json()["usage"]["completion_tokens"] == 5


def test_chat_is_refused_without_a_chat_template(prepared_dir):
    """A tokenizer without the chat tokens: 400 in OpenAI's shape (the app in-process; the route
    answers before the engine, which is not started)."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import build_model, model_config
    from lmforge.serve.app import build_app
    from lmforge.serve.engine import Engine

    tokenizer = load_tokenizer(prepared_dir / "tokenizer.json")
    engine = Engine(build_model(model_config("llama", "debug")), tokenizer.decode, max_batch=1)
    app = build_app(engine, tokenizer, "plain")

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            return await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
            )

    response = asyncio.run(ask())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "chat_template_missing" and "has no chat template" in error["message"]


def test_a_bad_option_is_one_line_and_exit_2(sharp_run, capsys):
    from lmforge.cli import main

    assert main(["serve", str(sharp_run), "--max-batch", "0"]) == 2
    assert capsys.readouterr().err == "lmforge: error: --max-batch must be >= 1, got 0\n"


def test_sigterm_stops_the_server_with_exit_code_0(server):
    """Last in this file: it ends the module's server."""
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    assert "Traceback" not in server.stderr()
