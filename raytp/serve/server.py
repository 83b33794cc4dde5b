"""The TP-group deployment: one replica = one placement group = one gang = one engine.

Its methods are the Python handle API (``serve.get_app_handle(name)`` reaches the
ingress; ``handle.<method>.remote`` below reaches this deployment through it):
``completions`` / ``chat_completions`` take an OpenAI request body and return the
response body; the ``*_stream`` variants are async generators of OpenAI chunks
(call them with ``handle.options(stream=True)``); ``generate`` / ``generate_stream``
take a prompt and sampling keywords and return text. Errors are ``raytp.errors``
types: ``InvalidRequestError`` (bad input), ``QueueFullError`` (at capacity),
``EngineDeadError`` (the gang failed; Serve replaces the replica).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace

from ray import serve

from raytp.api import openai as oai
from raytp.api import tools as tool_calls
from raytp.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from raytp.config import RaytpConfig, ResolvedConfig, resolve
from raytp.engine.protocol import EngineClient, RequestOutput
from raytp.engine.structured import grammar_for
from raytp.errors import ConfigError, InvalidRequestError, ModelNotFoundError
from raytp.serve.fanout import Choice, Fanout

logger = logging.getLogger("ray.serve")
EXIT_GRACE_S = 0.25  # after its gang fails, a replica lives this long so error events reach clients, then exits


def default_engine_factory(config: ResolvedConfig, tokenizer, stats) -> EngineClient:
    """The real engine: a TP gang of Ray actors in this replica's placement group."""
    from raytp.engine.engine import make_engine
    from raytp.gang.executor import RayExecutor

    return make_engine(config, RayExecutor(config), tokenizer, stats)


class LLMServer:
    """Serve deployment class (wrapped by ``serve.deployment`` in ``raytp.serve.app``).

    ``cfg`` is the user's config (validated where the app was built, without its API key); it is resolved
    here, on this replica's node (= rank 0's), before the gang starts. ``device``: the kind the placement
    bundles ask for. ``engine_factory(config, tokenizer, stats) -> EngineClient`` builds the engine
    (default: ``default_engine_factory``; tests plug in ``raytp.testing.scripted_engine_factory``)."""

    async def __init__(self, cfg: RaytpConfig, device: str, engine_factory=None):
        from transformers import AutoTokenizer

        from raytp.logs import quiet_client_errors
        from raytp.serve.metrics import ServerMetrics

        quiet_client_errors()
        started = time.perf_counter()
        try:
            self.config = await asyncio.to_thread(resolve, cfg, device)
        except ConfigError as e:  # the user's to fix: one clear line, then Serve fails the deployment with it
            logger.error("raytp: %s", e)
            raise
        config = self.config
        self.metrics = ServerMetrics(config.served_model_name, config.max_num_seqs)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
        self.engine: EngineClient = (engine_factory or default_engine_factory)(config, self.tokenizer, self.metrics)
        try:
            await self.engine.start()
        except ConfigError as e:  # e.g. a KV budget too small for one block: known only once the ranks loaded
            logger.error("raytp: %s", e)
            raise
        self.metrics.loaded(self.engine.load_reports)
        self.metrics.gang(True)
        self.startup_s = time.perf_counter() - started
        self._watchdog = asyncio.get_running_loop().create_task(self._exit_when_gang_dies())
        logger.info("raytp: TP=%d gang for %s healthy after %.1fs", config.tensor_parallel_size,
                    config.served_model_name, self.startup_s)

    def __del__(self):
        # Serve calls this when it stops the replica (scale-down, redeploy, failed health check):
        # free the ranks now rather than when Ray notices their owner is gone.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    async def _exit_when_gang_dies(self) -> None:
        # A replica whose gang died can only fail requests. Waiting for Serve's next health check would leave it
        # in the routing table for seconds, and a replica that fails fast attracts more requests (it always
        # looks idle). Exiting makes Serve drop it from routing at once and start a replacement (new placement
        # group, new gang); the ranks and their shared memory are already released by the executor.
        error = await self.engine.wait_dead()
        self.metrics.gang(False)
        logger.error("raytp: %s; this replica exits in %.2fs so Serve replaces it", error, EXIT_GRACE_S)
        await asyncio.sleep(EXIT_GRACE_S)
        os._exit(1)

    # ---- health ----------------------------------------------------------------------------
    async def check_health(self) -> None:
        """Serve's health check: raises when the gang is dead, so Serve replaces this replica."""
        self.engine.check_health()

    async def health(self) -> dict:
        self.engine.check_health()
        status = self.engine.status()
        return {
            "status": "ok",
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "device": self.config.device,
            "dtype": self.config.dtype,
            "startup_s": round(self.startup_s, 2),
            "num_running": status.num_running,
            "num_waiting": status.num_waiting,
            "num_finished": status.num_finished,
            "kv_cache": {"usage": round(status.kv_cache_usage, 4), "capacity_tokens": status.kv_cache_tokens,
                         "num_preemptions": status.num_preemptions,
                         "prefix_cache_hit_rate": round(status.prefix_cache_hit_rate, 4),
                         "prefix_cache_hit_tokens": status.prefix_cache_hit_tokens},
            "ranks": [vars(r) for r in self.engine.load_reports],
        }

    async def worker_pids(self) -> list[int]:
        """Process ids of this replica's ranks (for operators and fault tests)."""
        return await self.engine.worker_pids()

    async def models(self) -> dict:
        return {"object": "list", "data": [await self.model(self.config.served_model_name)]}

    async def model(self, model_id: str) -> dict:
        """``GET /v1/models/{id}``: the model object, or ``ModelNotFoundError`` (404)."""
        self._check_model(model_id)
        return {"id": self.config.served_model_name, "object": "model", "created": 0, "owned_by": "raytp",
                "root": self.config.model_path, "max_model_len": self.config.max_model_len}

    # ---- OpenAI ----------------------------------------------------------------------------
    # ``request_id``: the HTTP request's id (X-Request-Id), passed on by the ingress; else Serve's or a new one.
    async def completions(self, body, request_id: str | None = None) -> dict:
        return await self._collect(*self._prepare(body, chat=False, request_id=request_id))

    async def chat_completions(self, body, request_id: str | None = None) -> dict:
        return await self._collect(*self._prepare(body, chat=True, request_id=request_id))

    async def completions_stream(self, body, request_id: str | None = None):
        async for chunk in self._stream(*self._prepare(body, chat=False, request_id=request_id)):
            yield chunk

    async def chat_completions_stream(self, body, request_id: str | None = None):
        async for chunk in self._stream(*self._prepare(body, chat=True, request_id=request_id)):
            yield chunk

    # ---- plain Python ----------------------------------------------------------------------
    async def generate(self, prompt: str, **sampling) -> str:
        """Complete ``prompt``; keywords as in the completions API
        (max_tokens, temperature, top_p, top_k, stop, seed)."""
        body = await self.completions({"model": self.config.served_model_name, "prompt": prompt, **sampling})
        return body["choices"][0]["text"]

    async def generate_stream(self, prompt: str, **sampling):
        """Yield text deltas of ``prompt``'s completion."""
        body = {"model": self.config.served_model_name, "prompt": prompt, **sampling, "stream": True}
        async for chunk in self.completions_stream(body):
            if chunk["choices"] and chunk["choices"][0]["text"]:
                yield chunk["choices"][0]["text"]

    # ---- tokenizer extensions (vLLM's /tokenize and /detokenize) ------------------------------
    async def tokenize(self, body) -> dict:
        req = oai.parse(TokenizeRequest, body)
        self._check_model(req.model)
        if req.messages is not None:
            ids = self._chat_ids(req.messages, req.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": list(ids)}

    async def detokenize(self, body) -> dict:
        req = oai.parse(DetokenizeRequest, body)
        self._check_model(req.model)
        self._check_ids(req.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    # ---- shared path -----------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise ModelNotFoundError(f"model {model!r} is not served here; "
                                     f"available: {self.config.served_model_name!r}")

    def _choice_text_logprobs(self, c: Choice, texts: list[str], token_ids: list[int], entries: list, first: bool,
                              offset: int, chat: bool) -> tuple[str, dict | None]:
        """A choice's text and logprobs object for these output tokens (the whole choice, or one stream delta):
        echo puts the prompt (and its logprobs, the first one null) before the first piece; max_tokens 0 hides
        the output."""
        if c.drop_output:
            texts, token_ids, entries = [], [], []
        text = "".join(texts)
        if c.echo_text is not None and first:
            text = c.echo_text + text
            if c.prompt_logprobs is not None:
                prompt = oai.logprobs_body(self._token_text, list(c.prompt_ids), [None] + c.prompt_logprobs, chat, 0)
                rest = oai.logprobs_body(self._token_text, token_ids, entries, chat,
                                         len("".join(prompt["tokens"]))) if entries else None
                return text, oai.merge_logprobs(prompt, rest)
        return text, oai.logprobs_body(self._token_text, token_ids, entries, chat, offset)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _check_ids(self, ids, param: str) -> None:
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"{param}: token ids must be in [0, {vocab})", param=param)

    def _prepare(self, body, chat: bool, request_id: str | None = None):
        """Validate a request; return it with its id and its choices (prompts × n), each with engine params."""
        req = oai.parse(ChatCompletionRequest if chat else CompletionRequest, body)
        self._check_model(req.model)
        param = "messages" if chat else "prompt"
        requested = req.max_new_tokens if chat else req.max_tokens
        echo = not chat and req.echo
        if requested == 0 and not echo:
            raise InvalidRequestError("max_tokens: must be at least 1 (0 only with echo: true)", param="max_tokens")
        choices = []
        for i, prompt_ids in enumerate(self._prompts(req, chat)):
            room = self.config.max_model_len - len(prompt_ids)
            if room < 1:
                raise InvalidRequestError(
                    f"the prompt ({len(prompt_ids)} tokens) leaves no room for a completion within max_model_len "
                    f"({self.config.max_model_len}); shorten the prompt", param=param, code="context_length_exceeded")
            if requested is not None and requested > room:
                raise InvalidRequestError(
                    f"prompt ({len(prompt_ids)} tokens) + max_tokens ({requested}) exceeds max_model_len "
                    f"({self.config.max_model_len}); shorten the prompt or lower max_tokens to at most {room}",
                    param="max_tokens", code="context_length_exceeded")
            # max_tokens 0 (echo: score the prompt only): the engine samples once after a prompt; that token is hidden
            params = oai.sampling_params(req, requested or room, len(self.tokenizer))
            if echo and req.logprobs is not None:
                params = replace(params, prompt_logprobs=req.logprobs)
            if self._tool_mode(req, chat) == "forced":  # the call's JSON, token by token: it always parses
                schema = tool_calls.forced_schema(req.tools, req.effective_tool_choice, req.parallel_tool_calls)
                params = replace(params, grammar=grammar_for({"type": "json_schema", "json_schema": {
                    "name": "tool_call", "schema": schema}}))
            text = (self._prompt_text(req, i) if echo else None)
            choices += [Choice(i * req.n + j, prompt_ids, oai.for_choice(params, j), i * req.n, echo_text=text,
                               drop_output=requested == 0) for j in range(req.n)]
        request_id = _request_id("chatcmpl" if chat else "cmpl", request_id)
        logger.info("raytp: request %s: %d choices, %d prompt tokens, max_tokens %d", request_id, len(choices),
                    sum(len(c.prompt_ids) for c in choices if c.index == c.leader), choices[0].params.max_tokens)
        return req, Fanout(self.engine, request_id, choices, self.config.enable_prefix_caching), chat

    def _tool_mode(self, req, chat: bool) -> str | None:
        """None (no tool parsing), 'forced' (required / a named function) or 'auto' (parsed by tool_call_parser)."""
        choice = req.effective_tool_choice if chat else "none"
        if choice == "none":
            return None
        if choice != "auto":
            return "forced"
        if not self.config.tool_call_parser:
            raise InvalidRequestError(
                "tool_choice auto (the default when tools are given) needs the server's tool_call_parser config "
                "(e.g. hermes); or send tool_choice required, a named function, or none", param="tool_choice")
        return "auto"

    def _prompt_text(self, req, i: int) -> str:
        """Completion prompt i as text, for echo: as sent if it was text, else its tokens decoded."""
        p = req.prompt
        item = p if isinstance(p, str) or (p and isinstance(p[0], int)) else p[i]
        return item if isinstance(item, str) else self.tokenizer.decode(item)

    def _prompts(self, req, chat: bool) -> list[tuple[int, ...]]:
        """Token ids of each prompt: the chat rendered by the model's template, or each completion prompt."""
        if chat:
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            prompts = [self._chat_ids(req.messages, True, tools)]
        else:
            p = req.prompt
            many = isinstance(p, list) and bool(p) and not isinstance(p[0], int)
            items = p if many else [p]
            prompts = [self.tokenizer.encode(x) if isinstance(x, str) else x for x in items]
            for ids in prompts:
                self._check_ids(ids, "prompt")
        if not prompts or any(not ids for ids in prompts):
            raise InvalidRequestError("prompt is empty", param="messages" if chat else "prompt")
        return [tuple(ids) for ids in prompts]

    def _chat_ids(self, messages, add_generation_prompt: bool, tools: list | None = None) -> list[int]:
        """The chat rendered by the model's template (with ``tools``, for templates that render them)."""
        if not self.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        rendered = [m.for_template() for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(rendered, tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - a template that refuses these messages (roles, order): the caller's
            raise InvalidRequestError(f"the model's chat template cannot render these messages: {e}",
                                      param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def _collect(self, req, fanout: Fanout, chat: bool) -> dict:
        choices = await fanout.collect()
        for c in choices:
            _log_finished(fanout.engine_id(c), c.last)
        body, mode = [], self._tool_mode(req, chat)
        for c in choices:
            text, logprobs = self._choice_text_logprobs(c, c.text, c.token_ids, c.logprobs, True, 0, chat)
            calls = []
            if mode:
                text, found = tool_calls.extract(text, mode, req.effective_tool_choice, c.last.finish_reason)
                calls = tool_calls.tool_calls_body(found)
            body.append(oai.choice_body(c.index, text, logprobs, chat=chat, tool_calls=calls,
                                        finish_reason="tool_calls" if calls else c.last.finish_reason))
        return oai.completion_body(fanout.request_id, req.model, body, oai.usage(*fanout.usage()), chat)

    async def _stream(self, req, fanout: Fanout, chat: bool):
        if self._tool_mode(req, chat):
            async for chunk in self._stream_tool_calls(req, fanout):
                yield chunk
            return
        options = req.stream_options
        started: set[int] = set()
        offsets: dict[int, int] = {}  # per choice: characters of token text before this chunk's tokens
        async for c, out in fanout.stream():
            first = c.index not in started
            text, logprobs = self._choice_text_logprobs(c, [out.text], out.token_ids, out.logprobs or [], first,
                                                        offsets.get(c.index, 0), chat)
            if logprobs and not chat:
                offsets[c.index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            chunk = oai.stream_chunk(fanout.request_id, req.model, c.index, replace(out, text=text), chat,
                                     first=first, logprobs=logprobs)
            started.add(c.index)
            if options and options.continuous_usage_stats:
                chunk["usage"] = oai.usage(*fanout.usage())
            yield chunk
            if out.finished:
                _log_finished(fanout.engine_id(c), out)
        if options and options.include_usage:
            yield oai.usage_chunk(fanout.request_id, req.model, oai.usage(*fanout.usage()), chat)


    async def _stream_tool_calls(self, req, fanout: Fanout):
        """Chat with tool calls, streamed: a call is known only once its output is whole, so each choice's answer
        is sent when it finishes, as OpenAI's deltas (role and content, one delta per call, the finish reason)."""
        mode, model = self._tool_mode(req, True), req.model
        async for c, out in fanout.stream():
            if not out.finished:
                continue
            _log_finished(fanout.engine_id(c), out)
            content, found = tool_calls.extract("".join(c.text), mode, req.effective_tool_choice, out.finish_reason)
            calls = tool_calls.tool_calls_body(found)
            for delta in tool_calls.stream_deltas(content, calls):
                yield oai.delta_chunk(fanout.request_id, model, c.index, delta, None)
            yield oai.delta_chunk(fanout.request_id, model, c.index, {}, "tool_calls" if calls else out.finish_reason)
        if req.stream_options and req.stream_options.include_usage:
            yield oai.usage_chunk(fanout.request_id, model, oai.usage(*fanout.usage()), True)


def _request_id(prefix: str, rid: str | None) -> str:
    """``<prefix>-<request id>``. Over HTTP the id is the proxy's: the client's ``X-Request-Id`` header (or one
    Serve made), echoed in the response header and on Serve's log lines of the ingress; the ingress passes it
    here, so one id follows a request through ingress, server, engine and every rank's log. Handle callers get
    this replica's Serve request id, or a fresh one outside a request context."""
    if not rid:
        try:
            rid = serve.get_request_context().request_id
        except Exception:  # noqa: BLE001 - no Serve context (unit tests, direct calls)
            rid = ""
    return f"{prefix}-{rid}" if rid else oai.new_request_id(prefix)


def _log_finished(request_id: str, last: RequestOutput | None) -> None:
    # Counts only: prompts and outputs are never logged at INFO.
    if last is not None:
        logger.info("raytp: request %s finished (%s): %d prompt + %d completion tokens", request_id,
                    last.finish_reason, last.num_prompt_tokens, last.num_output_tokens)
