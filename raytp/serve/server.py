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

import logging
import time

from ray import serve

from raytp.api import openai as oai
from raytp.api.protocol import ChatCompletionRequest, CompletionRequest
from raytp.config import ResolvedConfig
from raytp.engine.types import RequestOutput
from raytp.errors import InvalidRequestError, ModelNotFoundError

logger = logging.getLogger("ray.serve")


def _default_engine(config: ResolvedConfig, tokenizer):
    from raytp.engine.engine import Engine
    from raytp.engine.scheduler import make_scheduler
    from raytp.executor import RayExecutor

    scheduler = make_scheduler(config.scheduling, config.max_num_seqs, config.max_queue_size,
                               config.max_num_batched_tokens)
    return Engine(RayExecutor(config), tokenizer, scheduler, seed=config.seed)


class LLMServer:
    """Serve deployment class (wrapped by ``serve.deployment`` in ``raytp.serve.app``)."""

    async def __init__(self, config: ResolvedConfig, engine_factory=None):
        from transformers import AutoTokenizer

        started = time.perf_counter()
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
        self.engine = (engine_factory or _default_engine)(config, self.tokenizer)
        await self.engine.start()
        self.startup_s = time.perf_counter() - started
        logger.info("raytp: TP=%d gang for %s healthy after %.1fs", config.tensor_parallel_size,
                    config.served_model_name, self.startup_s)

    def __del__(self):
        # Serve calls this when it stops the replica (scale-down, redeploy, failed health check):
        # free the ranks now rather than when Ray notices their owner is gone.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.executor.shutdown()

    # ---- health ----------------------------------------------------------------------------
    async def check_health(self) -> None:
        """Serve's health check: raises when the gang is dead, so Serve replaces this replica."""
        self.engine.check_health()

    async def health(self) -> dict:
        self.engine.check_health()
        return {
            "status": "ok",
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "startup_s": round(self.startup_s, 2),
            "num_running": self.engine.num_running,
            "num_waiting": self.engine.num_waiting,
            "num_finished": dict(self.engine.finished_counts),
            "ranks": [vars(r) for r in self.engine.load_reports],
        }

    async def worker_pids(self) -> list[int]:
        """Process ids of this replica's ranks (for operators and fault tests)."""
        return await self.engine.executor.pids()

    async def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.config.served_model_name, "object": "model", "created": 0, "owned_by": "raytp",
            "root": self.config.model_path, "max_model_len": self.config.max_model_len,
        }]}

    # ---- OpenAI ----------------------------------------------------------------------------
    async def completions(self, body) -> dict:
        return await self._collect(*self._prepare(body, chat=False))

    async def chat_completions(self, body) -> dict:
        return await self._collect(*self._prepare(body, chat=True))

    async def completions_stream(self, body):
        async for chunk in self._stream(*self._prepare(body, chat=False)):
            yield chunk

    async def chat_completions_stream(self, body):
        async for chunk in self._stream(*self._prepare(body, chat=True)):
            yield chunk

    # ---- plain Python ----------------------------------------------------------------------
    async def generate(self, prompt: str, **sampling) -> str:
        """Complete ``prompt``; keywords as in the completions API (max_tokens, temperature, top_p, top_k, stop, seed)."""
        body = await self.completions({"model": self.config.served_model_name, "prompt": prompt, **sampling})
        return body["choices"][0]["text"]

    async def generate_stream(self, prompt: str, **sampling):
        """Yield text deltas of ``prompt``'s completion."""
        body = {"model": self.config.served_model_name, "prompt": prompt, **sampling, "stream": True}
        async for chunk in self.completions_stream(body):
            if chunk["choices"] and chunk["choices"][0]["text"]:
                yield chunk["choices"][0]["text"]

    # ---- shared path -----------------------------------------------------------------------
    def _prepare(self, body, chat: bool):
        req = oai.parse(ChatCompletionRequest if chat else CompletionRequest, body)
        if req.model != self.config.served_model_name:
            raise ModelNotFoundError(f"model {req.model!r} is not served here; available: {self.config.served_model_name!r}")
        prompt_ids = self._prompt_ids(req, chat)
        room = self.config.max_model_len - len(prompt_ids)
        max_tokens = req.max_new_tokens if chat else req.max_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
                f"({self.config.max_model_len}); shorten the prompt or lower max_tokens",
                param="max_tokens" if room >= 1 else ("messages" if chat else "prompt"),
                code="context_length_exceeded",
            )
        params = oai.sampling_params(req, max_tokens if max_tokens is not None else room)
        request_id = oai.new_request_id("chatcmpl" if chat else "cmpl")
        return req, request_id, prompt_ids, params, chat

    def _prompt_ids(self, req, chat: bool) -> tuple[int, ...]:
        if chat:
            if not self.tokenizer.chat_template:
                raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt)
        else:
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in req.prompt):
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = req.prompt
        if not ids:
            raise InvalidRequestError("prompt is empty", param="messages" if chat else "prompt")
        return tuple(ids)

    async def _collect(self, req, request_id, prompt_ids, params, chat) -> dict:
        text, last = [], None
        async for out in self.engine.generate(request_id, prompt_ids, params):
            text.append(out.text)
            last = out
        return oai.completion_body(request_id, req.model, "".join(text), last, chat)

    async def _stream(self, req, request_id, prompt_ids, params, chat):
        last: RequestOutput | None = None
        async for out in self.engine.generate(request_id, prompt_ids, params):
            yield oai.stream_chunk(request_id, req.model, out, chat, first=last is None)
            last = out
        if req.stream_options and req.stream_options.include_usage:
            yield oai.usage_chunk(request_id, req.model, last, chat)
