"""The OpenAI-compatible HTTP server over an :class:`~rankwise.serve.Engine` (FastAPI).

    app = create_app(engine, api_key="s3cret")
    uvicorn.run(app, host="127.0.0.1", port=8000)   # or: rankwise serve --model smollm2 ...

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` sends
server-sent events ending with ``data: [DONE]``), ``GET /v1/models``, ``POST /v1/adapters``
(``{"name": ...}``: load a folder of the adapters folder), ``DELETE /v1/adapters/{name}``,
``GET /health`` and ``GET /metrics`` (Prometheus text). The ``model`` field of a request
names an adapter or the base model; an unknown name is a 404 listing the known ones, never
a silent fall-back to the base.

Safety: with ``api_key`` every route but ``/health`` needs ``Authorization: Bearer <key>``;
request bodies over ``max_body_bytes`` get a 413 before they are parsed; the engine's
limits (prompt length, ``max_tokens``, queue length) become 400 and 429 (with
``Retry-After``). Every error is a 4xx/5xx with OpenAI's JSON error body; no request can take
the server down. The app's lifespan starts the engine and, on shutdown (SIGTERM under
uvicorn), lets in-flight requests finish before stopping it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from rankwise.errors import ConfigError, RankwiseError
from rankwise.serve import GenerationRequest, QueueFullError, UnknownAdapterError
from rankwise.serve import openai_schema as oa
from rankwise.serve.listen import bind, url_of

DEFAULT_MAX_BODY_BYTES = 1 << 20
REQUEST_FIELD = re.compile(r"(prompt|max_tokens|temperature|top_p|seed|stop|model)\b")
PUBLIC_PATHS = frozenset({"/health"})
LOG = logging.getLogger("rankwise.serve")
T = TypeVar("T")

# Prometheus HELP text and type for the engine's metrics (others are exported as gauges).
METRICS = {
    "queue_length": ("gauge", "Requests waiting for a batch slot."),
    "running": ("gauge", "Requests in the running batch."),
    "generated_tokens_total": ("counter", "Tokens generated since start."),
    "tokens_per_s": ("gauge", "Generated tokens per second over the last 10 s."),
    "resident_adapters": ("gauge", "Adapters loaded in memory."),
    "evictions": ("counter", "Adapters evicted from memory (LRU) since start."),
    "adapter_loads": ("counter", "Adapter loads from disk since start."),
}


# ----------------------------------------------------------------------------- errors


def error_response(status: int, message: str, type_: str, *, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(oa.error_body(message, type_, param=param, code=code), status_code=status, headers=headers)


def engine_error(exc: Exception, *, model: str | None = None, base: str | None = None) -> JSONResponse:
    """The HTTP answer to an error the engine raised for one request (``model``: the name the
    request asked for; ``base``: the base model's name, listed first among the known ones)."""
    if isinstance(exc, UnknownAdapterError):
        message = str(exc)
        if model is not None:  # the engine's message names its folder: no paths to clients
            known = ", ".join(n for n in [base, *sorted(exc.known)] if n) or "none"
            message = f"model {model!r} is not served here; known models: {known}"
        return error_response(404, message, "invalid_request_error", param="model", code="model_not_found")
    if isinstance(exc, QueueFullError):
        retry = max(1, math.ceil(float(getattr(exc, "retry_after", 1) or 1)))
        return error_response(
            429, f"{exc}; retry after {retry} s", "rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)}
        )
    if isinstance(exc, oa.ProtocolError):
        return error_response(400, str(exc), "invalid_request_error", param=exc.param, code="unsupported")
    if isinstance(exc, RankwiseError):
        return error_response(400, str(exc), "invalid_request_error", param=_param_named(str(exc)))
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


def _param_named(message: str) -> str | None:
    """The request field an engine error is about (its messages start with the field's name)."""
    m = REQUEST_FIELD.match(message)
    return m.group(1) if m else None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line for pydantic's errors: the first field and what was wrong with it."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param=param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), kind, code=code, headers=exc.headers)

    async def _refused(request: Request, exc: Exception) -> JSONResponse:
        model = getattr(request.state, "model", None)
        return engine_error(exc, model=model, base=getattr(request.app.state, "base_name", None))

    # The request's own fault, answered quietly; anything else is a 500 from Guard (logged).
    for kind in (RankwiseError, UnknownAdapterError, QueueFullError, oa.ProtocolError):
        app.add_exception_handler(kind, _refused)


# ----------------------------------------------------------------------------- ASGI guard


class Guard:
    """The ASGI layer around the routes: bearer-token check, body size limit (413), status counts, and
    a JSON 500 for an unexpected exception (logged with its traceback).

    A body is read here in full (up to the limit) before the app sees it, so an oversize
    chunked body is refused as surely as one with a ``Content-Length`` header.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, counts: Counter) -> None:
        self.app, self.api_key, self.max_body_bytes, self.counts = app, api_key, max_body_bytes, counts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        started = False

        async def counted_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counts[message["status"]] += 1
            await send(message)

        refusal = self._refusal(scope)
        if refusal is None:
            body, too_large = await self._read_body(receive)
            if too_large:
                refusal = self._too_large()
        if refusal is not None:
            return await refusal(scope, receive, counted_send)
        try:
            await self.app(scope, _replay(body, receive), counted_send)
        except Exception as exc:  # a bug, not the request's fault: log it, answer 500, go on
            LOG.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                await engine_error(exc)(scope, receive, counted_send)

    def _refusal(self, scope) -> JSONResponse | None:
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS:
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return error_response(
                    401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                    "key the server was started with (--api-key or RANKWISE_API_KEY)",
                    "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> JSONResponse:
        return error_response(
            413, f"request body larger than the server's limit of {self.max_body_bytes} bytes "
            "(rankwise serve --max-body-bytes)", "invalid_request_error", code="body_too_large",
        )  # fmt: skip

    async def _read_body(self, receive) -> tuple[list[dict], bool]:
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, False
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return messages, True
            if not message.get("more_body", False):
                return messages, False


def _replay(messages: list[dict], receive):
    """An ASGI ``receive`` that hands out the buffered body, then the server's messages (the
    client's disconnect, which cancels a stream)."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


# ----------------------------------------------------------------------------- metrics


def prometheus_text(metrics: dict, status_counts: Counter) -> str:
    """The engine's metrics and the HTTP status counts in Prometheus' text format."""
    lines = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        kind, text = METRICS.get(key, ("gauge", key.replace("_", " ") + "."))
        name = f"rankwise_{key}"
        if kind == "counter" and not name.endswith("_total"):
            name += "_total"
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {float(value):g}"]
    lines += ["# HELP rankwise_http_responses_total HTTP responses by status code.", "# TYPE rankwise_http_responses_total counter"]
    lines += [f'rankwise_http_responses_total{{code="{code}"}} {n}' for code, n in sorted(status_counts.items())]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- generation


class Generation:
    """The routes' common part: turn a validated request into engine submissions and read
    their events back (as one JSON body or as server-sent events)."""

    def __init__(self, engine, default_max_tokens: int) -> None:
        self.engine, self.default_max_tokens = engine, default_max_tokens

    async def submit(self, body: oa._Sampling, prompts: list[str | list[int]], max_tokens: int) -> list:
        """One engine request per prompt (all or none: a refused one cancels the others)."""
        body.check_supported()
        handles = []
        try:
            for prompt in prompts:
                request = GenerationRequest(
                    model=body.model, prompt=prompt, max_tokens=max_tokens, temperature=body.temperature,
                    top_p=body.top_p, seed=body.seed, stop=body.stop_strings(),
                )  # fmt: skip
                handles.append(await run_in_threadpool(self.engine.submit, request))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    @staticmethod
    async def collect(handle) -> tuple[str, str | None, int, int]:
        """Text, finish reason, prompt and completion token counts of one finished request."""
        try:
            parts, reason = [], None
            async for event in handle.aevents():
                parts.append(event.text)
                reason = event.finish_reason or reason
            result = handle.result(timeout=60.0)
        finally:
            if not handle.done:
                handle.cancel()  # the client went away: free the slot
        return "".join(parts), reason or result.finish_reason, result.prompt_tokens, result.completion_tokens

    @staticmethod
    async def events(handle, render: Callable, tail: Callable[[object], list[dict]]) -> AsyncIterator[str]:
        """Server-sent events: ``render(event)`` gives each event's chunks, ``tail(result)``
        the closing ones; ends with ``data: [DONE]``. An error mid-stream is sent as an
        OpenAI error event (the status line is already out)."""
        try:
            async for event in handle.aevents():
                for chunk in render(event):
                    yield _sse(chunk)
            for chunk in tail(handle.result(timeout=60.0)):
                yield _sse(chunk)
        except Exception as exc:  # noqa: BLE001 - reported to the client, the server goes on
            yield _sse(json.loads(engine_error(exc).body))
        finally:
            if not handle.done:
                handle.cancel()
        yield "data: [DONE]\n\n"


async def while_connected(request: Request, work: Awaitable[T], poll: float = 0.25) -> T | None:
    """``work``'s result, or None if the client went away first: then ``work`` is cancelled,
    and with it its engine requests (an abandoned request must not hold a batch slot)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def client_gone() -> JSONResponse:
    """The answer to a client that left (nobody reads it; 499 shows in /metrics, as in nginx)."""
    return error_response(499, "the client closed the connection", "invalid_request_error", code="client_closed")


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _stream(lines: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(lines, media_type="text/event-stream", headers=headers)


# ----------------------------------------------------------------------------- the app


def create_app(
    engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_max_tokens: int | None = None,
    manage_engine: bool = True,
    shutdown_timeout: float = 30.0,
) -> FastAPI:
    """The FastAPI app serving ``engine``.

    ``api_key``: required as a bearer token on every route but ``/health`` (None: open, for a
    server bound to 127.0.0.1). ``max_body_bytes``: larger request bodies get a 413.
    ``default_max_tokens``: a chat request without ``max_tokens`` generates at most this
    many (default: the engine's ``max_new_tokens``). ``manage_engine``: the app's lifespan
    starts the engine and stops it (draining for up to ``shutdown_timeout`` s) on shutdown.
    """
    if api_key is not None and not api_key.strip():
        raise ConfigError("api_key must not be empty or blank (leave it unset for no authentication)")
    if max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    default_max_tokens = default_max_tokens or getattr(engine, "max_new_tokens", None) or 256
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            await run_in_threadpool(engine.start)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            if manage_engine:
                await run_in_threadpool(engine.stop, drain=True, timeout=shutdown_timeout)

    app = FastAPI(title="rankwise serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.base_name = engine.base_name
    _install_error_handlers(app)
    counts: Counter = Counter()
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, counts=counts)
    gen = Generation(engine, default_max_tokens)
    _add_generation_routes(app, gen)
    _add_admin_routes(app, engine, state, counts)
    return app


def _add_generation_routes(app: FastAPI, gen: Generation) -> None:
    @app.post("/v1/completions")
    async def completions(body: oa.CompletionRequest, request: Request):
        request.state.model = body.model
        body.check_supported()
        handles = await gen.submit(body, body.prompts(), body.max_tokens or gen.default_max_tokens)
        id_, created = oa.new_id("cmpl"), oa.now()

        def wrap(choices: list[dict], usage: dict | None = None) -> dict:
            return oa.envelope("text_completion", id_, created, body.model, choices, usage)

        if body.stream:

            def render(event) -> list[dict]:
                chunks = [wrap([oa.completion_choice(0, event.text, None)])] if event.text else []
                if event.finish_reason:
                    chunks.append(wrap([oa.completion_choice(0, "", event.finish_reason)]))
                return chunks

            def tail(result) -> list[dict]:
                usage = oa.usage(result.prompt_tokens, result.completion_tokens)
                return [wrap([], usage)] if body.include_usage() else []

            return _stream(gen.events(handles[0], render, tail))
        results = await while_connected(request, asyncio.gather(*(gen.collect(h) for h in handles)))
        if results is None:
            return client_gone()
        choices = [oa.completion_choice(i, text, reason) for i, (text, reason, _, _) in enumerate(results)]
        usage = oa.usage(sum(r[2] for r in results), sum(r[3] for r in results))
        return wrap(choices, usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oa.ChatCompletionRequest, request: Request):
        request.state.model = body.model
        body.check_supported()
        prompt = oa.chat_prompt(gen.engine.tokenizer, body.messages)
        (handle,) = await gen.submit(body, [prompt], body.token_limit(gen.default_max_tokens))
        id_, created = oa.new_id("chatcmpl"), oa.now()

        def wrap(kind: str, choices: list[dict], usage: dict | None = None) -> dict:
            return oa.envelope(kind, id_, created, body.model, choices, usage)

        if body.stream:
            chunk = "chat.completion.chunk"
            first = [wrap(chunk, [oa.chat_delta(0, {"role": "assistant", "content": ""}, None)])]

            def render(event) -> list[dict]:
                chunks = [first.pop()] if first else []
                if event.text:
                    chunks.append(wrap(chunk, [oa.chat_delta(0, {"content": event.text}, None)]))
                if event.finish_reason:
                    chunks.append(wrap(chunk, [oa.chat_delta(0, {}, event.finish_reason)]))
                return chunks

            def tail(result) -> list[dict]:
                usage = oa.usage(result.prompt_tokens, result.completion_tokens)
                return [wrap(chunk, [], usage)] if body.include_usage() else []

            return _stream(gen.events(handle, render, tail))
        result = await while_connected(request, gen.collect(handle))
        if result is None:
            return client_gone()
        text, reason, prompt_tokens, completion_tokens = result
        choice = oa.chat_choice(0, text, reason)
        return wrap("chat.completion", [choice], oa.usage(prompt_tokens, completion_tokens))


def _add_admin_routes(app: FastAPI, engine, state: dict, counts: Counter) -> None:
    @app.get("/health")
    async def health():
        if not state["ready"]:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "model": engine.base_name}

    @app.get("/metrics")
    async def metrics():
        text = prometheus_text(engine.metrics(), counts)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [oa.model_card(m, engine.base_name) for m in engine.models()]}

    @app.post("/v1/adapters")
    async def load_adapter(body: oa.AdapterLoadRequest, request: Request):
        request.state.model = body.name
        info = await run_in_threadpool(engine.load_adapter, body.name)
        return oa.model_card({"id": body.name, **(info or {})}, engine.base_name)

    @app.delete("/v1/adapters/{name:path}")
    async def unload_adapter(name: str):
        await run_in_threadpool(engine.unload_adapter, name)
        return {"id": name, "object": "model", "deleted": True}


# ----------------------------------------------------------------------------- running it


class ServerThread:
    """Serve ``app`` with uvicorn in a background thread (tests, notebooks, benchmarks)::

        with ServerThread(create_app(engine)) as server:
            httpx.get(server.url + "/health")

    Binds ``host`` (127.0.0.1) on a free port unless ``port`` is given; leaving the block
    shuts the server down as SIGTERM would (in-flight requests finish, the engine stops).
    """

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 startup_timeout: float = 60.0) -> None:  # fmt: skip
        import uvicorn

        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server at {self.url} did not start (see the log above)")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()
