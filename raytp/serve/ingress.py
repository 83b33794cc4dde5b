"""The ingress deployment: FastAPI routes of the OpenAI API, auth, SSE, errors, and the Python handle API.

HTTP: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /tokenize``, ``POST /detokenize`` (vLLM's extensions), ``GET /health``, the Responses API
(``POST /v1/responses``, ``GET /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``: answered by the chat path,
stored in this ingress replica; ``raytp.serve.responses_serving``), Anthropic's Messages API (``POST /v1/messages``,
``POST /v1/messages/count_tokens``: answered by the chat path, ``raytp.api.anthropic``), and vLLM's operational routes:
``GET /version``, SageMaker's ``GET|POST /ping`` (= /health) and ``POST /invocations`` (a chat completion or a
completion, by the body's ``messages`` / ``prompt``). With an API key configured, every route but /health, /ping
and /version needs it, as ``Authorization: Bearer <key>`` or ``x-api-key: <key>``. Every error is an OpenAI-style
body ``{"error": {message, type, param, code}}``, but on the Messages routes Anthropic's ``{"type": "error", "error":
{type, message}}`` (same status codes). A streaming client that disconnects cancels its server-side generator,
which aborts the request in the engine.

Python (``serve.get_app_handle(app_name)`` returns a handle to this deployment):
``generate(prompt, **sampling) -> str``, ``generate_stream(prompt, **sampling)``
(with ``handle.options(stream=True)``; yields text deltas), ``completions(body)`` /
``chat_completions(body)`` (OpenAI bodies in and out), ``completions_stream(body)`` /
``chat_completions_stream(body)`` (with ``stream=True``; yield OpenAI chunks), ``messages(body)`` and
``count_tokens(body)`` (Anthropic's), ``responses(body)`` (OpenAI's Responses API, not streamed), ``models()``,
``model(id)``, ``tokenize(body)``, ``detokenize(body)``, ``health()``. Invalid input raises
``InvalidRequestError`` (and the other typed errors of ``raytp.errors``), as the HTTP routes answer 4xx.
The server deployment behind it implements them (``raytp.serve.server``); these forward, so that one handle
serves every replica.
"""


import asyncio
import functools
import hmac
import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

import raytp
from raytp.api import anthropic
from raytp.api.openai import invalid_request, parse
from raytp.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from raytp.api.responses import ResponsesRequest
from raytp.errors import (
    AuthenticationError,
    EngineDeadError,
    InvalidRequestError,
    ModelLoadingError,
    PayloadTooLargeError,
    QueueFullError,
    RaytpError,
)
from raytp.serve.response_store import ResponseStore
from raytp.serve.responses_serving import ResponsesServing

logger = logging.getLogger("ray.serve")
HEALTH_TIMEOUT_S = 5.0  # a healthy replica answers /health in milliseconds, even while it decodes
_AUTH_MESSAGE = "missing or invalid API key (Authorization: Bearer <key>, or x-api-key: <key>)"
READY_WAIT_S = 1.0  # how long a request waits for the first ready replica before a 503
UPDATE_READY_WAIT_S = 60.0  # longest a new ingress replica in an update waits to reach a running server replica
app = FastAPI(title="raytp", description="Tensor-parallel LLM serving on Ray Serve (OpenAI-compatible API)")
# /invocations reads its body itself (which request it is depends on its keys); its schema is documented here
_INVOCATIONS_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    {"$ref": "#/components/schemas/ChatCompletionRequest"}, {"$ref": "#/components/schemas/CompletionRequest"}]}}}}}


def to_raytp_error(e: BaseException) -> RaytpError:
    """Map whatever a handle call raised to a typed raytp error."""
    if isinstance(e, RaytpError):
        return e
    cause = getattr(e, "cause", None)
    if isinstance(cause, RaytpError):
        return cause
    if isinstance(e, BackPressureError):  # Serve's own bounded queue in front of the replicas is full
        return QueueFullError("server is at capacity; retry later")
    if isinstance(e, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)) or isinstance(
            cause, RayActorError):
        return EngineDeadError("the model replica died; retry shortly while it is replaced")
    if isinstance(e, RayTaskError):
        logger.error("raytp: server error: %s", e)
        return RaytpError(f"internal error: {type(cause or e).__name__}")
    logger.exception("raytp: unexpected error", exc_info=e)
    return RaytpError(f"internal error: {type(e).__name__}")


@functools.cache
def _metrics():
    from raytp.serve.metrics import IngressMetrics

    return IngressMetrics()  # created once per ingress replica process, on first use


def error_response(err: RaytpError, path: str = "") -> JSONResponse:
    """The error's HTTP answer: an OpenAI-style body, or Anthropic's on its routes (by the request's ``path``)."""
    _metrics().error(err.error_type, err.status_code)
    retry = getattr(err, "retry_after_s", None)  # 429 and 503: the client may retry
    headers = {"Retry-After": str(retry)} if retry else None
    body = anthropic.error_body(err) if anthropic.is_messages_path(path) else err.to_dict()
    return JSONResponse(body, status_code=err.status_code, headers=headers)


@app.exception_handler(RequestValidationError)
async def _bad_request(request: Request, exc: RequestValidationError):
    return error_response(invalid_request(list(exc.errors())), request.url.path)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    err = RaytpError(str(exc.detail), code=str(exc.status_code))
    err.status_code = exc.status_code
    err.error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(err, request.url.path)


class BodySizeLimit:
    """ASGI middleware: an OpenAI-style 413 for bodies over ``limit`` bytes, from Content-Length before reading
    anything, or while a chunked body streams in (buffered up to the limit, then handed on), so an oversized
    request never reaches JSON parsing or the model. (Starlette's own limit answers in plain text.)"""

    limit = 1_048_576  # set per ingress process by OpenAIIngress.__init__

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._reject(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices for streaming responses
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        err = PayloadTooLargeError(f"request body is larger than the limit of {self.limit} bytes",
                                   code="request_too_large")
        await error_response(err, scope.get("path", ""))(scope, receive, send)


app.add_middleware(BodySizeLimit)


async def _sse(gen, first, route: str, started: float):
    """OpenAI SSE framing; a mid-stream failure becomes an error event, then [DONE]."""
    try:  # the server sends lists of the chunks ready together (one Ray object): one write, one event per chunk
        if first is not None:
            yield "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in first)
        async for batch in gen:
            yield "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in batch)
    except Exception as e:  # noqa: BLE001
        err = to_raytp_error(e)
        _metrics().error(err.error_type, err.status_code)
        yield f"data: {json.dumps(err.to_dict())}\n\n"
    finally:
        gen.cancel()  # no-op when finished; on client disconnect it aborts the request in the engine
        _metrics().request_s.observe(time.perf_counter() - started, tags={"route": route})
    yield "data: [DONE]\n\n"


def _stream_error(e: BaseException) -> RaytpError:
    err = to_raytp_error(e)
    _metrics().error(err.error_type, err.status_code)
    return err


async def _event_sse(gen, first, route: str, started: float):
    """The Responses API's SSE framing: ``event: <type>`` and ``data: <event>`` per event, no [DONE]. ``gen``
    yields lists of events and ends a failed stream with an error event itself."""
    def frame(events: list[dict]) -> str:
        return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)

    try:
        if first is not None:
            yield frame(first)
        async for events in gen:
            yield frame(events)
    finally:
        await gen.aclose()  # on client disconnect: cancels the chat stream, which aborts the request
        _metrics().request_s.observe(time.perf_counter() - started, tags={"route": route})


def _route(request: Request) -> str:
    """The matched route's template (``/v1/models/{model_id:path}``), not the raw path: a metric tag must not
    take one value per model id a client makes up (nor its non-ASCII characters, which Ray's tags refuse)."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _http_request_id() -> str:
    """The id Serve's proxy gave this HTTP request: the client's X-Request-Id if it sent one, else Serve's own,
    which Serve echoes in the response header and puts on its log lines. Serve exposes it only through its
    (private) request context; without it, raytp makes its own id (the server's fallback)."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - a Serve version without this helper
        return ""


@serve.ingress(app)
class OpenAIIngress:
    """``server``: the LLMServer deployment's handle, or (``ingress: in_server``) an ``InServer`` whose server this
    replica builds and calls in process (``raytp.serve.local_server``). ``api_key``: from the config, else env
    ``RAYTP_API_KEY`` on this ingress's node; it never leaves the ingress (nor, in process, reaches the server's
    config or the ranks)."""

    async def __init__(self, server, api_key: "str | None" = None, max_request_body_bytes: int = 1_048_576):
        from raytp.logs import quiet_client_errors
        from raytp.serve.local_server import InServer

        quiet_client_errors()
        self._local = isinstance(server, InServer)  # (a handle answers any attribute: no duck typing here)
        self.server = await server.start() if self._local else server
        self.api_key = api_key or os.environ.get("RAYTP_API_KEY") or None
        BodySizeLimit.limit = max_request_body_bytes
        self.responses_api = ResponsesServing(ResponseStore(), _stream_error)  # the Responses API's store lives here
        # Until a model replica has answered once, HTTP requests get 503 at once (a handle call would wait
        # for a replica for as long as the model takes to load, with no answer for the client).
        self._ready = asyncio.Event()
        self._not_ready_because: str | None = None  # the last failed readiness probe, for the 503's message
        if self._local:  # the server in this process has started: this replica is ready when Serve runs it
            self._ready.set()
        else:
            self._ready_task = asyncio.get_running_loop().create_task(self._wait_until_ready())
        # In an update (a new ingress version while some server replica already runs), this replica takes HTTP
        # traffic only once it reaches a server replica: else its first requests would get 503 while its handle
        # learns the running replicas (seconds on a busy host), though one could serve them. At first deploy no
        # server replica runs yet: this replica starts at once and answers 503 while the model loads.
        if not self._local and await asyncio.to_thread(self._server_replicas_running):
            try:
                await asyncio.wait_for(asyncio.shield(self._ready.wait()), UPDATE_READY_WAIT_S)
            except asyncio.TimeoutError:
                logger.warning("raytp: no server replica answered this new ingress replica within %.0fs",
                               UPDATE_READY_WAIT_S)

    def _server_replicas_running(self) -> bool:
        """Whether Serve's controller lists a RUNNING replica of the server deployment (of any version)."""
        try:
            app = serve.status().applications[self.server.app_name]
            return app.deployments[self.server.deployment_name].replica_states.get("RUNNING", 0) > 0
        except Exception:  # noqa: BLE001 - no such app or deployment yet: a first deploy
            return False

    async def _wait_until_ready(self) -> None:
        while True:
            try:
                await self.server.health.remote()
                self._ready.set()
                return
            except Exception as e:  # noqa: BLE001 - a replica that failed to start; its replacement may not
                self._not_ready_because = to_raytp_error(e).message
                await asyncio.sleep(1.0)

    async def _not_ready(self, message: str, path: str = "") -> "JSONResponse | None":
        """A 503 while no model replica has answered yet; None once one has."""
        if self._ready.is_set():
            return None
        try:  # a replica that has just become ready may not have reached this ingress's router yet
            await asyncio.wait_for(self._ready.wait(), READY_WAIT_S)
            return None
        except asyncio.TimeoutError:
            because = f" (last attempt: {self._not_ready_because})" if self._not_ready_because else ""
            return error_response(ModelLoadingError(message + because), path)

    async def _gate(self, request: Request) -> "JSONResponse | None":
        """An error response for a request that may not go on (bad API key, no model replica ready yet)."""
        if not self._authorized(request):
            return error_response(AuthenticationError(_AUTH_MESSAGE), request.url.path)
        return await self._not_ready("the model is still loading; retry shortly", request.url.path)

    # ---- HTTP ------------------------------------------------------------------------------
    @app.get("/health")
    async def http_health(self):
        """200 only when a replica's gang is loaded and warmed up; 503 otherwise, at once while none is ready."""
        loading = await self._not_ready("no model replica is ready yet")
        if loading is not None:
            return loading
        try:
            return await asyncio.wait_for(self.server.health.remote(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return error_response(EngineDeadError("no model replica answered in time"))
        except Exception as e:  # noqa: BLE001
            return error_response(to_raytp_error(e))

    @app.get("/ping", operation_id="ping_get")
    @app.post("/ping", operation_id="ping_post")  # SageMaker's probe may POST
    async def http_ping(self):
        """SageMaker's health check (vLLM serves it too): /health's answer. Never needs an API key."""
        return await self.http_health()

    @app.get("/version")
    async def http_version(self):
        """``{"version": raytp's version}``, as vLLM's /version; answered while the model loads too, without a
        key (it says nothing about the model)."""
        return {"version": raytp.__version__}

    @app.post("/invocations", openapi_extra=_INVOCATIONS_BODY)
    async def http_invocations(self, request: Request):
        """SageMaker's inference route (vLLM's): a body with ``messages`` is a chat completion, else one with
        ``prompt`` a completion, streamed if it asks; anything else is a 400. Needs the API key, as the routes it
        stands for do."""
        if not self._authorized(request):  # the 401, before the body is read: such a caller learns nothing
            return await self._gate(request)
        try:
            body = json.loads(await request.body())
        except ValueError as e:  # JSONDecodeError, or a body that is not UTF-8
            return error_response(InvalidRequestError(f"invalid JSON body: {e}", code="json_invalid"))
        chat = isinstance(body, dict) and "messages" in body
        if not chat and not (isinstance(body, dict) and "prompt" in body):
            return error_response(InvalidRequestError(
                "/invocations takes a chat completion (a JSON object with messages) or a completion (one with "
                "prompt)", code="invalid_invocation"))
        try:
            req = parse(ChatCompletionRequest if chat else CompletionRequest, body)
        except InvalidRequestError as e:
            return error_response(e)
        return await (self.http_chat(req, request) if chat else self.http_completions(req, request))

    @app.get("/v1/models")
    async def http_models(self, request: Request):
        started = time.perf_counter()
        return await self._unary(request, started, lambda: self.server.models.remote())

    @app.get("/v1/models/{model_id:path}")
    async def http_model(self, model_id: str, request: Request):
        started = time.perf_counter()
        return await self._unary(request, started, lambda: self.server.model.remote(model_id))

    @app.post("/tokenize")
    async def http_tokenize(self, body: TokenizeRequest, request: Request):
        started = time.perf_counter()
        return await self._unary(request, started, lambda: self.server.tokenize.remote(body))

    @app.post("/detokenize")
    async def http_detokenize(self, body: DetokenizeRequest, request: Request):
        started = time.perf_counter()
        return await self._unary(request, started, lambda: self.server.detokenize.remote(body))

    @app.post("/v1/messages")
    async def http_messages(self, body: anthropic.MessagesRequest, request: Request):
        """Anthropic's Messages API, answered by one chat completion (``raytp.api.anthropic``); errors in
        Anthropic's shape."""
        started, rid, path = time.perf_counter(), _http_request_id(), request.url.path
        if not self._authorized(request):  # the 401 before translating the body, as every route answers it
            return await self._gate(request)
        try:
            chat = anthropic.chat_request(body)
        except InvalidRequestError as e:
            return error_response(e, path)
        if body.stream:
            events = anthropic.MessageStream(body.model, body.stop_sequences)
            return await self._stream(request, started, lambda: anthropic.stream_events(
                self._batches("chat_completions", chat, rid), events, _stream_error), framing=_event_sse)
        return await self._unary(request, started, lambda: self._message(chat, body.stop_sequences, rid))

    async def _message(self, chat: ChatCompletionRequest, stop_sequences: "list[str] | None", rid: str) -> dict:
        return anthropic.message_body(await self.server.chat_completions.remote(chat, rid), stop_sequences)

    @app.post("/v1/messages/count_tokens")
    async def http_count_tokens(self, body: anthropic.CountTokensRequest, request: Request):
        """Anthropic's token count: the templated prompt's tokens (with the tools), as /tokenize counts them."""
        started, path = time.perf_counter(), request.url.path
        if not self._authorized(request):
            return await self._gate(request)
        try:
            tokenize = anthropic.tokenize_request(body)
        except InvalidRequestError as e:
            return error_response(e, path)
        return await self._unary(request, started, lambda: self._count_tokens(tokenize))

    async def _count_tokens(self, tokenize: TokenizeRequest) -> dict:
        return {"input_tokens": (await self.server.tokenize.remote(tokenize))["count"]}

    @app.post("/v1/completions")
    async def http_completions(self, body: CompletionRequest, request: Request):
        started, rid = time.perf_counter(), _http_request_id()
        if body.stream:
            return await self._stream(request, started, lambda: self._batches("completions", body, rid))
        return await self._unary(request, started, lambda: self.server.completions.remote(body, rid))

    @app.post("/v1/chat/completions")
    async def http_chat(self, body: ChatCompletionRequest, request: Request):
        started, rid = time.perf_counter(), _http_request_id()
        if body.stream:
            return await self._stream(request, started, lambda: self._batches("chat_completions", body, rid))
        return await self._unary(request, started, lambda: self.server.chat_completions.remote(body, rid))

    @app.post("/v1/responses")
    async def http_responses(self, body: ResponsesRequest, request: Request):
        """OpenAI's Responses API, answered by one chat completion (``raytp.api.responses``)."""
        started, rid = time.perf_counter(), _http_request_id()
        if body.stream:
            return await self._stream(request, started, lambda: self.responses_api.stream(
                body, lambda chat: self._batches("chat_completions", chat, rid)), framing=_event_sse)
        return await self._unary(request, started, lambda: self.responses_api.create(
            body, lambda chat: self.server.chat_completions.remote(chat, rid)))

    @app.get("/v1/responses/{response_id}")
    async def http_response(self, response_id: str, request: Request):
        return await self._stored_response(request, self.responses_api.retrieve, response_id)

    @app.post("/v1/responses/{response_id}/cancel")
    async def http_cancel_response(self, response_id: str, request: Request):
        return await self._stored_response(request, self.responses_api.cancel, response_id)

    async def _stored_response(self, request: Request, action, response_id: str):
        """GET / cancel of a stored response: the store is this process's, so only the API key is checked (they
        are answered while the model loads too)."""
        started = time.perf_counter()
        if not self._authorized(request):
            result = error_response(AuthenticationError(_AUTH_MESSAGE))
        else:
            try:
                result = action(response_id)
            except RaytpError as e:
                result = error_response(e)
        _metrics().request_s.observe(time.perf_counter() - started, tags={"route": _route(request)})
        return result

    async def _unary(self, request: Request, started: float, call):
        """A whole-body response from ``call()`` (a handle call), or an error body."""
        result = await self._gate(request)
        if result is None:
            try:
                result = await call()
            except Exception as e:  # noqa: BLE001
                result = error_response(to_raytp_error(e), request.url.path)
        _metrics().request_s.observe(time.perf_counter() - started, tags={"route": _route(request)})
        return result

    def _batches(self, kind: str, body, request_id: str | None = None):
        """A streaming call of the server's ``<kind>_stream_batches``: lists of the chunks ready together."""
        return getattr(self.server.options(stream=True), f"{kind}_stream_batches").remote(body, request_id)

    async def _stream(self, request: Request, started: float, call, framing=_sse):
        """SSE of the chunks ``call()`` (a streaming handle call) yields, framed by ``framing``. Errors before the
        first chunk (bad input, queue full) are plain HTTP errors; later ones become an error event."""
        refused = await self._gate(request)
        if refused is None:
            gen = call()
            try:
                first = await gen.__anext__()
            except StopAsyncIteration:
                first = None
            except Exception as e:  # noqa: BLE001
                refused = error_response(to_raytp_error(e), request.url.path)
        if refused is not None:
            _metrics().request_s.observe(time.perf_counter() - started, tags={"route": _route(request)})
            return refused
        return StreamingResponse(framing(gen, first, _route(request), started), media_type="text/event-stream")

    def _authorized(self, request: Request) -> bool:
        """The API key as ``Authorization: Bearer <key>`` (OpenAI's clients) or ``x-api-key`` (Anthropic's)."""
        if not self.api_key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = ([token] if scheme.lower() == "bearer" else []) + request.headers.getlist("x-api-key")
        # as bytes: compare_digest refuses strings with non-ASCII characters, which a client's header may carry
        return any(hmac.compare_digest(g.strip().encode(), self.api_key.encode()) for g in given)

    # ---- Python handle API -----------------------------------------------------------------
    async def generate(self, prompt: str, **sampling) -> str:
        return await self.server.generate.remote(prompt, **sampling)

    async def generate_stream(self, prompt: str, **sampling):
        async for delta in self.server.options(stream=True).generate_stream.remote(prompt, **sampling):
            yield delta

    async def completions(self, body: dict) -> dict:
        return await self.server.completions.remote(body)

    async def chat_completions(self, body: dict) -> dict:
        return await self.server.chat_completions.remote(body)

    async def completions_stream(self, body: dict):
        async for batch in self._batches("completions", body):
            for chunk in batch:
                yield chunk

    async def chat_completions_stream(self, body: dict):
        async for batch in self._batches("chat_completions", body):
            for chunk in batch:
                yield chunk

    async def messages(self, body: dict) -> dict:
        """Anthropic's Messages API, not streamed: the message body ``POST /v1/messages`` answers."""
        req = parse(anthropic.MessagesRequest, body)
        return await self._message(anthropic.chat_request(req), req.stop_sequences, None)

    async def count_tokens(self, body: dict) -> dict:
        """Anthropic's ``POST /v1/messages/count_tokens``: ``{"input_tokens": n}``."""
        return await self._count_tokens(anthropic.tokenize_request(parse(anthropic.CountTokensRequest, body)))

    async def responses(self, body: dict) -> dict:
        """OpenAI's Responses API, not streamed (stored in this ingress replica's store if ``store``)."""
        return await self.responses_api.create(parse(ResponsesRequest, body),
                                           lambda chat: self.server.chat_completions.remote(chat))

    async def models(self) -> dict:
        return await self.server.models.remote()

    async def model(self, model_id: str) -> dict:
        return await self.server.model.remote(model_id)

    async def tokenize(self, body: dict) -> dict:
        return await self.server.tokenize.remote(body)

    async def detokenize(self, body: dict) -> dict:
        return await self.server.detokenize.remote(body)

    async def health(self) -> dict:
        return await self.server.health.remote()

    # ---- the server's Serve hooks, when it lives in this replica (``ingress: in_server``) ---------------------------
    async def check_health(self) -> None:
        """Serve's health check: the in-process server's (its ranks answer); nothing to check for a handle."""
        if self._local:
            await self.server.server.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling hook: the in-process server's TTFT window (``TTFTPolicy``); none for a handle."""
        return self.server.server.record_autoscaling_stats() if self._local else {}

    async def worker_pids(self) -> list[int]:
        """The in-process server's rank pids (operators, fault tests), as the LLMServer deployment answers them."""
        return await self.server.worker_pids.remote()

    def __del__(self):
        # Serve stops this replica: free the in-process server's ranks now (LLMServer.__del__ does the same).
        if getattr(self, "_local", False):
            self.server.server.__del__()
