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

from ray import serve

from raytp.config import RaytpConfig, ResolvedConfig, resolve
from raytp.engine.protocol import EngineClient
from raytp.errors import ConfigError
from raytp.serve.openai_serving import OpenAIServing

logger = logging.getLogger("ray.serve")
EXIT_GRACE_S = 0.25  # after its gang fails, a replica lives this long so error events reach clients, then exits


async def ready_batches(chunks, min_items: int = 1):
    """Lists of the items of the async iterator ``chunks`` that are ready together: one item is awaited, then
    whatever else has arrived meanwhile joins it. After the first list (sent at once: time to first token), a list
    waits until it holds ``min_items`` (the config's ``stream_interval``) or the stream ends. An error ends the
    iteration after the items before it, as it would have; closing this closes ``chunks`` (a disconnected client
    aborts its request)."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump():
        try:
            async for chunk in chunks:
                queue.put_nowait(chunk)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, in order
            queue.put_nowait(e)
        else:
            queue.put_nowait(end)

    task = asyncio.get_running_loop().create_task(pump())
    wanted = 1  # the first list goes as soon as it has an item
    try:
        while True:
            batch, item = [], await queue.get()
            while True:
                if item is end or isinstance(item, BaseException):
                    if batch:
                        yield batch
                    if item is end:
                        return
                    raise item
                batch.append(item)
                if queue.empty() and len(batch) >= wanted:
                    break
                item = queue.get_nowait() if not queue.empty() else await queue.get()
            yield batch
            wanted = min_items
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


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
        self.openai = OpenAIServing(config, self.tokenizer, self.engine)
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

    @classmethod
    async def create(cls, cfg: RaytpConfig, device: str, engine_factory=None) -> "LLMServer":
        """The server as an object of the calling replica (``ingress: in_server``), started as Serve starts it."""
        server = cls.__new__(cls)
        await server.__init__(cfg, device, engine_factory)
        return server

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
        """Serve's health check (every 2 s): asks the ranks themselves, so a gang that died while no request
        reached it (prefix routing may send none for a while) is found now; raises when it is dead, and the
        watchdog makes this replica exit, so Serve replaces it."""
        await self.engine.probe()

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

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling hook: this replica's TTFT p90 over the last window, for ``TTFTPolicy``."""
        from raytp.serve.autoscaling import METRIC

        return {METRIC: self.metrics.ttft_window.p90()}

    async def worker_pids(self) -> list[int]:
        """Process ids of this replica's ranks (for operators and fault tests)."""
        return await self.engine.worker_pids()

    async def models(self) -> dict:
        return {"object": "list", "data": [await self.model(self.config.served_model_name)]}

    async def model(self, model_id: str) -> dict:
        """``GET /v1/models/{id}``: the model object, or ``ModelNotFoundError`` (404)."""
        return self.openai.model_card(model_id)

    # ---- OpenAI ----------------------------------------------------------------------------
    # ``request_id``: the HTTP request's id (X-Request-Id), passed on by the ingress; else Serve's or a new one.
    async def completions(self, body, request_id: str | None = None) -> dict:
        return await self.openai.completion(body, False, request_id)

    async def chat_completions(self, body, request_id: str | None = None) -> dict:
        return await self.openai.completion(body, True, request_id)

    # The ingress streams through these: the same chunks, in lists of those ready together, so the chunks of a
    # stream that pile up while this replica or Serve is busy cross the Ray hop to the ingress as one object (each
    # is still one SSE event for the client). Nothing waits to fill a list.
    async def completions_stream_batches(self, body, request_id: str | None = None):
        async for batch in ready_batches(self.openai.completion_stream(body, False, request_id),
                                         self.config.stream_interval):
            yield batch

    async def chat_completions_stream_batches(self, body, request_id: str | None = None):
        async for batch in ready_batches(self.openai.completion_stream(body, True, request_id),
                                         self.config.stream_interval):
            yield batch

    # ---- plain Python ----------------------------------------------------------------------
    async def generate(self, prompt: str, **sampling) -> str:
        """Complete ``prompt``; keywords as in the completions API
        (max_tokens, temperature, top_p, top_k, stop, seed)."""
        body = await self.completions({"model": self.config.served_model_name, "prompt": prompt, **sampling})
        return body["choices"][0]["text"]

    async def generate_stream(self, prompt: str, **sampling):
        """Yield text deltas of ``prompt``'s completion."""
        body = {"model": self.config.served_model_name, "prompt": prompt, **sampling, "stream": True}
        async for chunk in self.openai.completion_stream(body, False):
            if chunk["choices"] and chunk["choices"][0]["text"]:
                yield chunk["choices"][0]["text"]
    # ---- tokenizer extensions (vLLM's /tokenize and /detokenize) ------------------------------
    async def tokenize(self, body) -> dict:
        return self.openai.tokenize(body)

    async def detokenize(self, body) -> dict:
        return self.openai.detokenize(body)
