"""OpenAI request bodies ⇄ the engine, for one replica: each request is validated against what only the replica
knows (the served name, the tokenizer's vocabulary and chat template, max_model_len, tools), split into its
choices (prompts × n) on the engine (``raytp.serve.fanout``; with ``use_beam_search``, each prompt's n best
beams, ``raytp.serve.beam_search``), and answered as OpenAI bodies or SSE chunks (with logprobs, echo, tool calls,
and vLLM's prompt_logprobs). The deployment (``raytp.serve.server``) delegates its
OpenAI methods here.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ray import serve

from raytp.api import openai as oai
from raytp.api import tools as tool_calls
from raytp.api.protocol import (
    STANDARD_ROLES,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from raytp.config import ResolvedConfig
from raytp.engine.protocol import EngineClient, RequestOutput
from raytp.engine.structured import grammar_of
from raytp.engine.tokenizer import LockedTokenizer
from raytp.errors import InvalidRequestError, ModelNotFoundError
from raytp.serve import beam_search
from raytp.serve.fanout import Choice, Fanout

logger = logging.getLogger("ray.serve")


class OpenAIServing:
    """Requests are prepared (validated, templated, tokenized, grammars compiled) on a worker thread, not on the
    replica's event loop, which streams every request's results: a long prompt or a large schema then never delays
    another request's tokens (the engine steps on a thread of its own). That thread and the loop (``/tokenize``,
    ``/detokenize``, logprobs' token texts) share the tokenizer through a lock (``raytp.engine.tokenizer``)."""

    def __init__(self, config: ResolvedConfig, tokenizer, engine: EngineClient):
        self.config = config
        self.tokenizer = LockedTokenizer(tokenizer)
        self.engine = engine
        self._prep = ThreadPoolExecutor(1, thread_name_prefix="raytp-prepare")
        # apply_chat_template's own arguments (this transformers version's): chat_template_kwargs cannot set them
        self._template_params = frozenset(
            name for name, p in inspect.signature(self.tokenizer.apply_chat_template).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        # tool_choice auto's parser: configured, else what the chat template implies (decided once, here)
        self.tool_call_parser = config.tool_call_parser
        if self.tool_call_parser is None:
            self.tool_call_parser = tool_calls.detect_parser(self.tokenizer)
            logger.info("raytp: tool_call_parser not configured; %s", f"detected {self.tool_call_parser!r} from "
                        "the chat template" if self.tool_call_parser else "none detected from the chat template "
                        "(tool_choice auto is refused)")

    # ``request_id``: the HTTP request's id (X-Request-Id), passed on by the ingress; else Serve's or a new one.
    async def completion(self, body, chat: bool, request_id: str | None = None) -> dict:
        return await self._collect(*await self._prepared(body, chat, request_id))

    async def completion_stream(self, body, chat: bool, request_id: str | None = None):
        async for chunk in self._stream(*await self._prepared(body, chat, request_id)):
            yield chunk

    async def _prepared(self, body, chat: bool, request_id: str | None):
        call = functools.partial(contextvars.copy_context().run, self._prepare, body, chat, request_id)
        return await asyncio.get_running_loop().run_in_executor(self._prep, call)

    def model_card(self, model_id: str) -> dict:
        """The model object, or ``ModelNotFoundError`` (404)."""
        self._check_model(model_id)
        return {"id": self.config.served_model_name, "object": "model", "created": 0, "owned_by": "raytp",
                "root": self.config.model_path, "max_model_len": self.config.max_model_len}

    # ---- tokenizer extensions (vLLM's /tokenize and /detokenize) ------------------------------
    def tokenize(self, body) -> dict:
        req = oai.parse(TokenizeRequest, body)
        self._check_model(req.model)
        if req.messages is not None:  # vLLM's defaults: special tokens are the template's (added for a prompt)
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            ids = self._chat_ids(req, tools, add_special_tokens=bool(req.add_special_tokens))
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        return {"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": list(ids)}

    def detokenize(self, body) -> dict:
        req = oai.parse(DetokenizeRequest, body)
        self._check_model(req.model)
        self._check_ids(req.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    # ---- shared path -----------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise ModelNotFoundError(f"model {model!r} is not served here; "
                                     f"available: {self.config.served_model_name!r}")

    def _choice_text_logprobs(self, req, c: Choice, texts: list[str], token_ids: list[int], entries: list,
                              first: bool, offset: int, chat: bool) -> tuple[str, dict | None]:
        """A choice's text and logprobs object for these output tokens (the whole choice, or one stream delta):
        echo puts the prompt, or in chat the assistant's last message, before the first piece (a completion's
        echo with logprobs puts the prompt's logprobs first, the first one null); max_tokens 0 hides the
        output."""
        if c.drop_output:
            texts, token_ids, entries = [], [], []
        text = "".join(texts)
        token_text = _token_id_text if req.return_tokens_as_token_ids else self._token_text
        if c.echo_text is not None and first:
            text = c.echo_text + text
            if c.echo_logprobs is not None and c.prompt_logprobs is not None:
                k = c.echo_logprobs  # the engine may hold more alternatives, for prompt_logprobs
                scored = [None] + [(e[0], e[1][:k], e[2]) for e in c.prompt_logprobs]
                prompt = oai.logprobs_body(token_text, list(c.prompt_ids), scored, chat, 0)
                rest = oai.logprobs_body(token_text, token_ids, entries, chat,
                                         len("".join(prompt["tokens"]))) if entries else None
                return text, oai.merge_logprobs(prompt, rest)
        return text, oai.logprobs_body(token_text, token_ids, entries, chat, offset)

    def _prompt_logprobs(self, req, c: Choice) -> list | None:
        """vLLM's ``prompt_logprobs`` of a choice's prompt, if the request asked (never in a stream)."""
        if req.prompt_logprobs is None or req.stream or c.prompt_logprobs is None:
            return None
        return oai.prompt_logprobs_body(self._token_text, c.prompt_ids, c.prompt_logprobs, req.prompt_logprobs)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids, param: str) -> None:
        oai.check_token_ids(ids, len(self.tokenizer), param)

    def _prepare(self, body, chat: bool, request_id: str | None = None):
        """Validate a request; return it, its choices (prompts × n, each with engine params) on the engine, ``chat``
        and its tool-call mode (``_tool_mode``, decided once)."""
        req = oai.parse(ChatCompletionRequest if chat else CompletionRequest, body)
        if not req.model:  # absent or "": the one served model (vLLM's behaviour); responses name it
            req = req.model_copy(update={"model": self.config.served_model_name})
        self._check_model(req.model)
        param = "messages" if chat else "prompt"
        requested = req.max_new_tokens if chat else req.max_tokens
        echo = not chat and req.echo
        if requested == 0 and not echo:
            raise InvalidRequestError("max_tokens: must be at least 1 (0 only with echo: true)", param="max_tokens")
        if req.use_beam_search:
            beam_search.check_request(req, chat)
        mode = self._tool_mode(req, chat)
        grammar = self._grammar(req, mode)  # compiled once for every prompt and choice
        items = self._prompt_items(req, chat)
        # prompt logprobs: a completion's echo with logprobs, and vLLM's prompt_logprobs (not streamed); the engine
        # computes the larger number of alternatives once
        echo_logprobs = req.logprobs if echo else None
        wanted = [k for k in (echo_logprobs, None if req.stream else req.prompt_logprobs) if k is not None]
        choices = []
        for i, prompt_ids in enumerate(self._prompts(req, chat, items)):
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
            params = oai.sampling_params(req, requested or room, len(self.tokenizer), grammar)
            if wanted:
                params = replace(params, prompt_logprobs=max(wanted))
            text = self._echo_text(req, chat, items[i] if items else None, prompt_ids)
            choices += [Choice(i * req.n + j, prompt_ids, oai.for_choice(params, j), i * req.n, echo_text=text,
                               echo_logprobs=echo_logprobs, drop_output=requested == 0) for j in range(req.n)]
        request_id = _request_id("chatcmpl" if chat else "cmpl", request_id)
        logger.info("raytp: request %s: %d choices, %d prompt tokens, max_tokens %d", request_id, len(choices),
                    sum(len(c.prompt_ids) for c in choices if c.index == c.leader), choices[0].params.max_tokens)
        if req.use_beam_search:  # n = the beam width: each prompt's n choices are its n best beams
            fanout = beam_search.BeamSearch(self.engine, request_id, choices, req.length_penalty,
                                            self.tokenizer.eos_token_id, self._decode)
        else:
            fanout = Fanout(self.engine, request_id, choices, self.config.enable_prefix_caching)
        return req, fanout, chat, mode

    def _tool_mode(self, req, chat: bool) -> str | None:
        """None (no tool parsing), 'forced' (required / a named function) or 'auto' (parsed by tool_call_parser)."""
        choice = req.effective_tool_choice if chat else "none"
        if choice == "none":
            return None
        if choice != "auto":
            return "forced"
        if not self.tool_call_parser:
            raise InvalidRequestError(
                "tool_choice auto (the default when tools are given) needs a tool_call_parser: none is configured "
                "and none was detected from the model's chat template; configure one (e.g. hermes), or send "
                "tool_choice required, a named function, or none", param="tool_choice")
        return "auto"

    def _grammar(self, req, tool_mode: str | None) -> str | None:
        """What constrains the output: a forced tool call's JSON (required / a named function: it always
        parses), else the one of ``response_format`` / ``structured_outputs`` / ``guided_*`` the request sets
        (two are a 400 naming the second; the request model refuses tool calls with any), else nothing."""
        if tool_mode == "forced":
            schema = tool_calls.forced_schema(req.tools, req.effective_tool_choice, req.parallel_tool_calls)
            return grammar_of("json", schema, "tools")
        found = req.structured_constraints()
        if len(found) > 1:
            raise InvalidRequestError(f"{found[1][0]}: only one output constraint per request, and {found[0][0]} "
                                      "is set too", param=found[1][0])
        return grammar_of(found[0][1], found[0][2], found[0][0]) if found else None

    @staticmethod
    def _prompt_items(req, chat: bool) -> list:
        """A completion's prompts as sent (text or token ids), one per choice group; [] for chat."""
        if chat:
            return []
        p = req.prompt
        return p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]

    def _echo_text(self, req, chat: bool, item, prompt_ids: tuple[int, ...]) -> str | None:
        """What echo puts before the output: a completion's prompt (as sent if it was text and not truncated,
        else its tokens decoded); in chat, the last message's content when it is the assistant's (vLLM's)."""
        if not req.echo:
            return None
        if chat:
            last = req.messages[-1]
            return last.text if last.role == "assistant" else None
        if isinstance(item, str) and req.truncate_prompt_tokens is None:
            return item
        return self.tokenizer.decode(prompt_ids)

    def _prompts(self, req, chat: bool, items: list) -> list[tuple[int, ...]]:
        """Token ids of each prompt: the chat rendered by the model's template, or each completion prompt; the
        last ``truncate_prompt_tokens`` of each, if asked."""
        if chat:
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            prompts = [self._chat_ids(req, tools, req.add_special_tokens)]
        else:
            prompts = [self.tokenizer.encode(x, add_special_tokens=req.add_special_tokens) if isinstance(x, str) else x
                       for x in items]
            for ids in prompts:
                self._check_ids(ids, "prompt")
        if not prompts or any(not ids for ids in prompts):
            raise InvalidRequestError("prompt is empty", param="messages" if chat else "prompt")
        keep = req.truncate_prompt_tokens
        if keep is not None:
            keep = self.config.max_model_len if keep == -1 else keep
            if keep > self.config.max_model_len:
                raise InvalidRequestError(f"truncate_prompt_tokens ({keep}) exceeds max_model_len "
                                          f"({self.config.max_model_len})", param="truncate_prompt_tokens")
            prompts = [ids[-keep:] for ids in prompts]
        return [tuple(ids) for ids in prompts]

    def _chat_ids(self, req, tools: list | None = None, add_special_tokens: bool = False) -> list[int]:
        """The chat of ``req`` (a chat completion or /tokenize request) rendered by the model's template, with
        ``tools`` for templates that render them and vLLM's template options: ``add_generation_prompt``,
        ``continue_final_message`` (the prompt ends inside the final message: transformers strips what the template
        puts after it), ``chat_template_kwargs`` (more template variables)."""
        if not self.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        extra = dict(req.chat_template_kwargs or {})
        taken = sorted(extra.keys() & self._template_params)
        if taken:
            raise InvalidRequestError(f"chat_template_kwargs: {', '.join(taken)} cannot be set here (arguments of "
                                      "apply_chat_template itself; some are request fields)",
                                      param="chat_template_kwargs")
        rendered = [m.for_template() for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                rendered, tools=tools, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, **extra)
        except Exception as e:  # noqa: BLE001 - a template that refuses these messages (roles, order): the caller's
            custom = sorted({m.role for m in req.messages} - set(STANDARD_ROLES))
            roles = f" (custom roles here: {', '.join(repr(r) for r in custom)})" if custom else ""
            raise InvalidRequestError(f"the model's chat template cannot render these messages{roles}: {e}",
                                      param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def _collect(self, req, fanout: Fanout, chat: bool, mode: str | None) -> dict:
        choices = await fanout.collect()
        for c in choices:
            _log_finished(fanout.engine_id(c), c.last)
        body = []
        for c in choices:
            text, logprobs = self._choice_text_logprobs(req, c, c.text, c.token_ids, c.logprobs, True, 0, chat)
            calls = []
            if mode:
                text, found = tool_calls.extract(text, mode, req.effective_tool_choice, c.last.finish_reason)
                calls = tool_calls.tool_calls_body(found)
            body.append(oai.choice_body(c.index, text, logprobs, chat=chat, tool_calls=calls,
                                        finish_reason="tool_calls" if calls else c.last.finish_reason))
            if not chat:  # vLLM: per choice in completions, null when not asked (clients read the key)
                body[-1]["prompt_logprobs"] = self._prompt_logprobs(req, c)
        out = oai.completion_body(fanout.request_id, req.model, body, oai.usage(*fanout.usage()), chat)
        if chat:  # vLLM: once, beside the choices, in chat (one prompt); null when not asked
            out["prompt_logprobs"] = self._prompt_logprobs(req, choices[0])
        return out

    async def _stream(self, req, fanout: Fanout, chat: bool, mode: str | None):
        if mode:
            async for chunk in self._stream_tool_calls(req, fanout, mode):
                yield chunk
            return
        options = req.stream_options
        started: set[int] = set()
        offsets: dict[int, int] = {}  # per choice: characters of token text before this chunk's tokens
        async for c, out in fanout.stream():
            first = c.index not in started
            text, logprobs = self._choice_text_logprobs(req, c, [out.text], out.token_ids, out.logprobs or [],
                                                        first, offsets.get(c.index, 0), chat)
            if logprobs and not chat:
                offsets[c.index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            chunk = oai.stream_chunk(fanout.request_id, req.model, c.index, replace(out, text=text), chat,
                                     first=first, logprobs=logprobs)
            started.add(c.index)
            if options and options.include_usage and options.continuous_usage_stats:  # vLLM: only with usage on
                chunk["usage"] = oai.usage(*fanout.usage())
            yield chunk
            if out.finished:
                _log_finished(fanout.engine_id(c), out)
        if options and options.include_usage:
            yield oai.usage_chunk(fanout.request_id, req.model, oai.usage(*fanout.usage()), chat)

    async def _stream_tool_calls(self, req, fanout: Fanout, mode: str):
        """Chat with tool calls, streamed: a call is known only once its output is whole, so each choice's answer
        is sent when it finishes, as OpenAI's deltas (role and content, one delta per call, the finish reason)."""
        model = req.model
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


def _token_id_text(token_id: int) -> str:
    """vLLM's ``return_tokens_as_token_ids``: a token as ``token_id:N`` (its text may not be valid UTF-8 alone)."""
    return f"token_id:{token_id}"


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
