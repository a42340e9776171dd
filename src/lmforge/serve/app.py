"""The HTTP side: OpenAI's completions API (its request and response shapes) on top of the engine.

Routes: POST /v1/completions, POST /v1/chat/completions (a model with the chat template only:
lmforge.data.sft), GET /v1/models, GET /health. A request is checked, encoded and submitted to the
engine (lmforge.serve.engine), whose events come back on an asyncio queue; a streamed response
sends them as server-sent events (`data: {json}`, then `data: [DONE]`) as they come.

Every refusal is a 4xx JSON body in OpenAI's error shape, `{"error": {"message", "type", "param",
"code"}}`: a body that is not JSON or not the schema (checked with pydantic in strict mode: a
string where a number goes is an error, not converted), an option that is not supported (n > 1,
echo, logprobs, ...), a prompt that leaves no room in the context. The body is parsed here, not
by FastAPI, so that JSON is read whatever the Content-Type (`curl -d` sends a form's) and every
error takes the same shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer

from lmforge.data.sft import CHAT_TOKENS, has_chat_template, render
from lmforge.errors import ConfigError
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.engine import Engine, Event, GenerationRequest, RequestHandle

EOS = "<|eos|>"  # the document separator of lmforge's tokenizers: where a completion ends

# ---------------------------------------------------------------------------------------------------
# Request schemas (OpenAI's fields; those marked "extension" are lmforge's, as vLLM also takes them)
# ---------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool | None = None


class _Sampling(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored, as OpenAI's clients may send
    newer ones; a field that is known but not supported is refused (`_refuse_unsupported`)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # extension
    min_p: float | None = Field(None, ge=0, le=1)  # extension
    repetition_penalty: float | None = Field(None, gt=0)  # extension (CTRL's, as `lmforge generate`)
    presence_penalty: float | None = None  # 0 only (`_refuse_unsupported`)
    frequency_penalty: float | None = None  # 0 only
    ignore_eos: bool | None = None  # extension (vLLM's): generate max_tokens whatever the model says
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape
# ---------------------------------------------------------------------------------------------------


class APIError(Exception):
    """A refusal: the HTTP status and the fields of OpenAI's error object."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(errors: list[Any]) -> APIError:
    """pydantic's (or FastAPI's) list of errors → one 400: the first field named, with what is wrong."""
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        return APIError(f"the request body is not valid JSON: {detail}", code="invalid_json")
    loc = [str(part) for part in first["loc"] if part != "body"]
    if not loc:
        return APIError(f"the request body must be a JSON object: {first['msg']}")
    param = loc[0]
    # A union (prompt: str | list[str]) gives one error per member, under the same field: say each.
    messages = dict.fromkeys(
        e["msg"] for e in errors if [str(p) for p in e["loc"] if p != "body"][:1] == loc[:1]
    )
    # (a union's members add their type to the location: name the field alone then)
    where = param if len(messages) > 1 else ".".join(loc)
    return APIError(f"{where}: {'; or '.join(messages)}", param=param, code="invalid_value")


BaseModelT = TypeVar("BaseModelT", bound=BaseModel)


def _parse(model: type[BaseModelT], body: bytes) -> BaseModelT:
    if not body.strip():
        raise APIError("the request body is empty: send a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise _validation_error(err.errors()) from None


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------


def build_app(
    engine: Engine, tokenizer: Tokenizer, model_id: str, on_ready: Callable[[], None] | None = None
) -> FastAPI:
    """The FastAPI app serving `engine` under the name `model_id`. The engine's thread starts with
    the app (its lifespan) and stops with it; on_ready is called once it serves."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(engine.start)  # with --compile this is where it compiles
        if on_ready is not None:
            on_ready()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lmforge", lifespan=lifespan)
    created = int(time.time())
    chat = has_chat_template(tokenizer)
    eos_id = tokenizer.token_to_id(EOS)
    end_ids = frozenset(i for i in (eos_id,) if i is not None)
    # A chat answer ends at the <|im_end|> that closes the assistant's turn (or at a document's end).
    chat_end_ids = frozenset(i for i in (eos_id, tokenizer.token_to_id(CHAT_TOKENS[1])) if i is not None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return APIError(str(exc.detail), code=code, status=exc.status_code).response()

    @app.get("/health")
    async def health() -> dict:
        stats = engine.stats
        return {
            "status": "ok",
            "model": model_id,
            "max_batch": engine.max_batch,
            "active": engine.n_active,
            "waiting": engine.n_waiting,
            "admitted": stats.admitted,
            "finished": dict(stats.finished),
            "completion_tokens": stats.completion_tokens,
            "decode_steps": stats.steps,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict:
        _check_model(name, model_id)
        return _model_card(model_id, created)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = _parse(CompletionRequest, await request.body())
        _check_model(body.model, model_id)
        _refuse_unsupported(body)
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise APIError(
                f"prompt: a string or a list of one string, got a list of {len(body.prompt)} (send one "
                "request per prompt: concurrent requests are batched together)",
                param="prompt",
            )
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        ids = _fit(tokenizer.encode(prompt).ids, eos_id, engine.max_seq_len, "prompt")
        # OpenAI's default for the completions endpoint is 16 tokens.
        generation = _generation_request(body, ids, body.max_tokens or 16, end_ids)
        handle = _submit(engine, generation)
        response = CompletionResponse("cmpl", "text_completion", model_id, len(ids), chat=False)
        return await _respond(response, handle, request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = _parse(ChatCompletionRequest, await request.body())
        _check_model(body.model, model_id)
        if not chat:
            raise APIError(
                f"the model {model_id} has no chat template (its tokenizer has no {' and '.join(CHAT_TOKENS)} "
                "tokens): use /v1/completions, or fine-tune it on chat data (lmforge finetune, data.task sft)",
                code="chat_template_missing",
            )
        _refuse_unsupported(body)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        ids = _fit(
            render(messages, tokenizer, generation_prompt=True)[0], eos_id, engine.max_seq_len, "messages"
        )
        # OpenAI's chat default: up to the context's end.
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.max_seq_len
        handle = _submit(engine, _generation_request(body, ids, max_tokens, chat_end_ids))
        response = CompletionResponse("chatcmpl", "chat.completion", model_id, len(ids), chat=True)
        return await _respond(response, handle, request, body)

    return app


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "lmforge"}


def _check_model(name: str | None, model_id: str) -> None:
    """A request may leave `model` out; if it names one, it must be this server's."""
    if name is not None and name != model_id:
        raise APIError(
            f"the model {name!r} does not exist: this server serves {model_id!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
            status=404,
        )


def _refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for an option that is known but not implemented: better refused than silently ignored."""
    if body.n not in (None, 1):
        raise APIError(f"n: only n=1 is supported, got {body.n}", param="n", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(
                f"{name} is not supported (only 0): use repetition_penalty (> 1 makes tokens already in "
                "the prompt or the output less likely)",
                param=name,
                code="unsupported_value",
            )
    if body.logit_bias:
        raise APIError("logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise APIError("echo is not supported (only echo=false)", param="echo", code="unsupported_value")
        if body.logprobs is not None:
            raise APIError("logprobs are not supported", param="logprobs", code="unsupported_parameter")
        if body.best_of not in (None, 1):
            raise APIError("best_of is not supported (only 1)", param="best_of", code="unsupported_value")
        if body.suffix:
            raise APIError("suffix is not supported", param="suffix", code="unsupported_parameter")
    else:
        if body.logprobs or body.top_logprobs:
            raise APIError("logprobs are not supported", param="logprobs", code="unsupported_parameter")
        if body.tools:
            raise APIError("tools are not supported", param="tools", code="unsupported_parameter")
        if body.response_format and body.response_format.get("type") != "text":
            raise APIError(
                "response_format: only {'type': 'text'} is supported",
                param="response_format",
                code="unsupported_value",
            )
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options is only allowed with stream=true", param="stream_options")


def _fit(ids: list[int], eos_id: int | None, max_seq_len: int, param: str) -> list[int]:
    """The prompt's ids, if they leave room for one new token; an empty prompt starts from the
    document separator, as every training document does after the one before it."""
    ids = ids or [eos_id or 0]
    if len(ids) >= max_seq_len:
        raise APIError(
            f"this model's context is {max_seq_len} tokens; the {param} has {len(ids)} tokens and must leave "
            "room for at least one new token",
            param=param,
            code="context_length_exceeded",
        )
    return ids


def _generation_request(
    body: _Sampling, ids: list[int], max_tokens: int, end_ids: frozenset[int]
) -> GenerationRequest:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise APIError("stop: stop strings must not be empty", param="stop", code="invalid_value")
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty or 1.0,
            stop=tuple(stop),
            seed=body.seed,
        )
    except ConfigError as err:  # the schema's bounds already hold these; a last line of defence
        raise APIError(str(err).replace("--", "").replace("-", "_")) from None
    return GenerationRequest(ids, params, frozenset() if body.ignore_eos else end_ids)


def _submit(engine: Engine, generation: GenerationRequest) -> RequestHandle:
    try:
        return engine.submit(generation)
    except RuntimeError:  # the engine stopped: the server is shutting down
        raise APIError("the server is shutting down", status=503, type="server_error") from None


# ---------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------


async def _respond(
    response: CompletionResponse, handle: RequestHandle, request: Request, body: _Sampling
) -> Any:
    """The completion as server-sent events (stream=true), or whole once it is done."""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(response.chunks(_events(handle, request, watch=False), include_usage))
    return await response.whole(_events(handle, request, watch=True))


async def _events(handle: RequestHandle, request: Request, watch: bool) -> AsyncIterator[list[Event]]:
    """The request's events as they come, a batch of those already queued at a time, until its
    last. If the consumer stops early (a streaming client that went away: Starlette cancels the
    response), the request is cancelled and the engine frees its slot. watch: also look ten times
    a second whether the client went away (for a response that sends nothing until the end, whose
    handler Starlette does not cancel)."""
    watcher = asyncio.create_task(_cancel_on_disconnect(handle, request)) if watch else None
    try:
        while True:
            event = await handle.events.get()
            events = [event]
            while not event.finish_reason and not handle.events.empty():
                event = handle.events.get_nowait()
                events.append(event)
            yield events
            if event.finish_reason:
                handle.finished = True
                return
    finally:
        if watcher is not None:
            watcher.cancel()
        if not handle.finished:
            handle.cancel()


async def _cancel_on_disconnect(handle: RequestHandle, request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    handle.cancel()  # the engine frees the slot and sends a last event, "cancelled"


class CompletionResponse:
    """OpenAI's response objects for one completion: whole (`whole`) or as stream chunks (`chunks`)."""

    def __init__(self, prefix: str, kind: str, model_id: str, prompt_tokens: int, chat: bool) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.kind = kind
        self.model_id = model_id
        self.prompt_tokens = prompt_tokens
        self.chat = chat
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return body

    def _usage(self, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    async def whole(self, events: AsyncIterator[list[Event]]) -> dict | JSONResponse:
        parts, last = [], None
        async for batch in events:
            parts += [event.text for event in batch]
            last = batch[-1]
        if last is None or last.finish_reason in (None, "cancelled"):  # the client went away
            return APIError("the client disconnected", status=499).response()  # (nobody reads it)
        if last.finish_reason == "error":
            return APIError(last.error or "generation failed", status=500, type="server_error").response()
        text = "".join(parts)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": last.finish_reason}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        return self._object(self.kind, [choice], self._usage(last.completion_tokens))

    async def chunks(self, events: AsyncIterator[list[Event]], include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, the last with its finish_reason, (the usage),
        then `[DONE]`. Events that queued up while the client read are sent in one write."""
        kind = "chat.completion.chunk" if self.chat else self.kind
        if self.chat:  # OpenAI's first chat chunk names the role
            yield _data(self._object(kind, [self._choice({"role": "assistant", "content": ""}, None)]))
        async for batch in events:
            out = []
            for event in batch:
                if event.finish_reason == "cancelled":  # the client is gone (a last event, unread)
                    return
                if event.finish_reason == "error":
                    error = APIError(event.error or "generation failed", status=500, type="server_error")
                    out.append(_data(error.body()))
                    continue
                if not event.text and event.finish_reason is None:
                    continue
                delta = {"content": event.text} if self.chat else event.text
                out.append(_data(self._object(kind, [self._choice(delta, event.finish_reason)])))
                if event.finish_reason and include_usage:
                    out.append(_data(self._object(kind, [], self._usage(event.completion_tokens))))
            yield "".join(out)
        yield "data: [DONE]\n\n"

    def _choice(self, delta: dict | str, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: each event should reach the client when it is sent
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
