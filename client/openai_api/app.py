"""The FastAPI application: OpenAI's /v1/models, /v1/completions and /v1/chat/completions over the swarm.

Responsibility: turn OpenAI requests into ``GenerationParams`` (prompt tokens, limits, sampling) and
the engine's events into OpenAI's JSON bodies or server-sent events. Invariants: every error, ours
or the framework's, reaches the client in OpenAI's error format with its HTTP status; a failure
before the route is open is an HTTP status, one after it (mid-stream) an error event that ends the
stream; a generation whose client has gone is cancelled, streaming or not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from homeswarm.client.chat_template import ChatTemplate, ChatTemplateError
from homeswarm.client.openai_api.engine import (
    Failed,
    Finished,
    Generation,
    GenerationParams,
    Opened,
    SwarmEngine,
    TextDelta,
)
from homeswarm.client.openai_api.schemas import APIError, ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# A chat request without max_tokens stops here (or at the end of the context, if sooner): running to the
# end of a long context takes longer than the openai client's 600 s timeout, after which it retries silently
CHAT_DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class ServedModel:
    id: str  # the model name clients ask for
    context_length: int  # max_position_embeddings: prompt plus completion must fit
    vocab_size: int
    chat_template: ChatTemplate | None
    created: int  # unix time the server started
    default_max_tokens: int = CHAT_DEFAULT_MAX_TOKENS  # a chat request's completion limit when it sets none


class BearerAuth:
    """Refuse (401) every request whose ``Authorization`` is not ``Bearer <api key>``."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                error = APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class GenerationStream(StreamingResponse):
    """A stream of server-sent events that cancels its generation however the response ends
    (client gone, server stopping), also when the body iterator never started."""

    def __init__(self, content: AsyncIterator[str], generation: Generation):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.cancel()


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if tuple(first.get("loc", ())) == ("body",):
        return "the request body must be a JSON object", None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    """Cancel ``generation`` when the client disconnects (the body is read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel()
            return


def create_app(engine: SwarmEngine, served: ServedModel, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="homeswarm", summary="OpenAI-compatible API over a homeswarm swarm",
                  openapi_url=None, docs_url=None, redoc_url=None)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        messages = {404: f"no such endpoint: {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        message = messages.get(exc.status_code, str(exc.detail))
        return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=exc)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)

    def model_card() -> dict[str, Any]:
        return {"id": served.id, "object": "model", "created": served.created, "owned_by": "homeswarm"}

    def check_model(name: str) -> None:
        if name != served.id:
            raise APIError(404, f"The model `{name}` does not exist: this server serves `{served.id}`",
                           param="model", code="model_not_found")

    def token_budget(prompt_len: int, requested: int | None, param: str, prompt_param: str) -> int:
        """max_tokens as requested, or the default cut to the context left; 400 when the prompt and the
        completion exceed the context."""
        limit = served.context_length
        max_tokens = requested if requested is not None else min(served.default_max_tokens, limit - prompt_len)
        if max_tokens < 1 or prompt_len + max_tokens > limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the {prompt_param}, {max(max_tokens, 1)} "
                f"in the completion). Please reduce the length of the {prompt_param} or {param}.",
                param=param if requested is not None else prompt_param, code="context_length_exceeded")
        return max_tokens

    def params_for(body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
                   max_tokens: int) -> GenerationParams:
        return GenerationParams(
            prompt_ids=prompt_ids, max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p, top_k=body.top_k, seed=body.seed, stops=tuple(body.stops))

    def completion_prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one (schemas refuse larger ones)
        if isinstance(prompt, str):
            ids = engine.codec.encode(prompt)
        else:
            ids = list(prompt)  # type: ignore[arg-type]
            if any(not 0 <= i < served.vocab_size for i in ids):
                raise APIError(400, f"prompt token ids must be in 0..{served.vocab_size - 1}", param="prompt")
        if not ids:
            raise APIError(400, "the prompt is empty (it encodes to no tokens)", param="prompt")
        return ids

    def chat_prompt(body: ChatCompletionRequest) -> list[int]:
        if served.chat_template is None:
            raise APIError(400, f"the model `{served.id}` has no chat template (tokenizer_config.json has no "
                           "chat_template): use /v1/completions", param="messages")
        try:
            text = served.chat_template.render([m.as_template_input() for m in body.messages])
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = engine.codec.encode(text, add_special_tokens=False)  # the template wrote them
        if not ids:
            raise APIError(400, "the conversation renders to no tokens", param="messages")
        return ids

    async def run(request: Request, params: GenerationParams, *, stream: bool, include_usage: bool,
                  chunk: Callable[[str | None, str | None], dict[str, Any]],
                  whole: Callable[[Finished], dict[str, Any]], preamble: dict[str, Any] | None) -> Any:
        generation = engine.start(params)
        try:
            first = await generation.next_event()  # Opened, or why the swarm could not serve
        except BaseException:
            generation.cancel()
            raise
        if isinstance(first, Failed):
            raise first.error
        assert isinstance(first, Opened)
        prompt_tokens = len(params.prompt_ids)
        if stream:
            return GenerationStream(
                _events(generation, prompt_tokens, include_usage, chunk, preamble), generation)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            while True:
                event = await generation.next_event()
                if isinstance(event, Finished):
                    return {**whole(event), "usage": _usage(prompt_tokens, event.completion_tokens)}
                if isinstance(event, Failed):
                    raise event.error
        finally:
            watcher.cancel()
            generation.cancel()

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        prompt_ids = completion_prompt(body.prompt)
        requested = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        max_tokens = token_budget(len(prompt_ids), requested, "max_tokens", "prompt")
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": served.id}

        def chunk(text: str | None, finish_reason: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                         "finish_reason": finish_reason}]}

        def whole(done: Finished) -> dict[str, Any]:
            return chunk(done.text, done.finish_reason)

        return await run(request, params_for(body, prompt_ids, max_tokens), stream=bool(body.stream),
                         include_usage=body.include_usage, chunk=chunk, whole=whole, preamble=None)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        prompt_ids = chat_prompt(body)
        requested_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = token_budget(len(prompt_ids), body.token_limit, requested_param, "messages")
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": served.id, "system_fingerprint": None}

        def chunk(text: str | None, finish_reason: str | None) -> dict[str, Any]:
            delta = {} if text is None else {"content": text}
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        def whole(done: Finished) -> dict[str, Any]:
            message = {"role": "assistant", "content": done.text}
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "logprobs": None,
                                 "finish_reason": done.finish_reason}]}

        preamble = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]}
        return await run(request, params_for(body, prompt_ids, max_tokens), stream=bool(body.stream),
                         include_usage=body.include_usage, chunk=chunk, whole=whole, preamble=preamble)

    return app


async def _events(generation: Generation, prompt_tokens: int, include_usage: bool,
                  chunk: Callable[[str | None, str | None], dict[str, Any]],
                  preamble: dict[str, Any] | None) -> AsyncIterator[str]:
    """The server-sent events of a streamed generation: chunks, the finish reason, usage, [DONE];
    or, when the swarm fails mid-stream, an error event and the end of the stream."""
    if preamble is not None:
        yield _sse(preamble)
    while True:
        event = await generation.next_event()
        if isinstance(event, TextDelta):
            yield _sse(chunk(event.text, None))
        elif isinstance(event, Finished):
            yield _sse(chunk(None, event.finish_reason))
            if include_usage:
                last = chunk(None, None)
                yield _sse({**last, "choices": [], "usage": _usage(prompt_tokens, event.completion_tokens)})
            yield _sse("[DONE]")
            return
        elif isinstance(event, Failed):
            yield _sse(event.error.body())
            return
