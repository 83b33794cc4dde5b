"""The engine as the server sees it: requests in, streams of deltas out, on the replica's event loop.

``Engine`` is the ``raytp.engine.protocol.EngineClient`` the server uses. The work runs in an
``raytp.engine.core.EngineCore`` on a thread of its own (schedule → launch → finish, detokenization, stop strings,
grammars, metrics); this side only checks a request, hands it to the core, and turns each step's batch of outputs
into the waiting requests' streams (vLLM v1's AsyncLLM + output queues over its EngineCore). Requests enter
through ``generate`` (an async iterator of ``RequestOutput`` deltas) and leave when finished, aborted (the
iterator is closed) or failed (a typed error: ``EngineDeadError`` once the gang or the core fails, or when the
engine shuts down).

The tokenizer given is this side's; the core decodes with a copy of its own, so the two threads never share one
(a Hugging Face fast tokenizer is one Rust object whose settings each call rewrites: ``raytp.engine.tokenizer``).
"""

from __future__ import annotations

import asyncio
import copy
import logging

from raytp.engine.core import EngineCore, Outputs
from raytp.engine.protocol import EngineStatus, Executor
from raytp.engine.scheduler import SchedulerConfig
from raytp.engine.stats import EngineStats
from raytp.errors import ConfigError, EngineDeadError, InvalidRequestError, check_token_ids
from raytp.messages import SamplingParams

logger = logging.getLogger(__name__)


def make_engine(config, executor: Executor, tokenizer, stats: EngineStats | None = None) -> Engine:
    """The engine a ``ResolvedConfig`` describes, over ``executor``."""
    return Engine(executor, tokenizer, SchedulerConfig.of(config), seed=config.seed, stats=stats)


class Engine:
    """Owns an executor and the core that drives it. ``scheduling`` says which ``raytp.engine.scheduler`` policy
    to build once the gang reports its KV blocks; ``stats`` is an ``EngineStats`` observer, called on the core's
    thread (the warm-up request is not reported to it, nor counted in ``status()``)."""

    def __init__(self, executor: Executor, tokenizer, scheduling: SchedulerConfig | None = None, *, seed: int = 0,
                 stats: EngineStats | None = None):
        self.executor = executor
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.core = EngineCore(executor, copy.deepcopy(tokenizer), scheduling or SchedulerConfig(), seed=seed,
                               stats=stats)
        self.load_reports = []
        self._streams: dict[str, asyncio.Queue] = {}  # live requests: where their outputs go
        self._loop: asyncio.AbstractEventLoop | None = None
        self._died: asyncio.Event | None = None
        self._dead: EngineDeadError | None = None

    @property
    def scheduling(self) -> SchedulerConfig:
        return self.core.scheduling

    @scheduling.setter
    def scheduling(self, value: SchedulerConfig) -> None:  # benchmarks switch async scheduling between runs
        self.core.scheduling = value

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, warmup: bool = True) -> None:
        """Start the gang, then the core, and (optionally) prove the path with a 2-token warm-up generation. Raises
        ``ConfigError`` if the ranks' KV budget cannot hold a single block (the gang is shut down)."""
        self._loop = asyncio.get_running_loop()
        self._died = asyncio.Event()
        # the gang starts from this loop: a Serve replica's placement group is this task's
        self.load_reports = await self.executor.start()
        num_blocks = min(r.num_kv_blocks for r in self.load_reports)
        bs = self.scheduling.block_size
        if {r.kv_block_size for r in self.load_reports} != {bs}:
            self.executor.shutdown()
            raise ConfigError("block_size", f"the ranks' KV blocks hold {self.load_reports[0].kv_block_size} tokens, "
                              f"the scheduler's {bs}: build both from the same config")
        if num_blocks < 2:
            self.executor.shutdown()
            per_block = max(r.kv_block_bytes for r in self.load_reports)
            raise ConfigError("kv_cache_memory_bytes", f"the KV cache budget holds {max(num_blocks - 1, 0)} usable "
                              f"blocks on some rank; one block of {bs} tokens takes {per_block} bytes per rank and "
                              f"a request needs at least one: raise it to at least {2 * per_block} (or lower "
                              "block_size).")
        self.core.start(num_blocks, self)
        logger.info("raytp: KV cache of %d blocks x %d tokens = %d tokens per replica (prefix caching %s)",
                    num_blocks - 1, bs, self.core.scheduler.kv.capacity_tokens,
                    "on" if self.scheduling.enable_prefix_caching else "off")
        if warmup:  # proves the whole path once; an operator's counters start after it
            prompt = tuple(self.tokenizer.encode("warm up", add_special_tokens=False)) or (0,)
            params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            async for _ in self._generate("warmup", prompt, params, report=False):
                pass

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the gang or the core has failed."""
        if self._dead is not None:
            raise self._dead
        if not self.core.alive:
            raise self.core.dead or EngineDeadError("engine loop is not running")

    async def probe(self) -> None:
        self.check_health()
        try:
            await self.executor.probe()
        except EngineDeadError as e:
            self._on_died(e)  # on this (the caller's) loop: fail what waits, wake wait_dead
            raise

    async def wait_dead(self) -> EngineDeadError:
        """Return the error once the gang or the core has failed (never returns while healthy)."""
        await self._died.wait()
        return self._dead

    def shutdown(self) -> None:
        """Fail every in-flight request, stop the core and free the gang. Idempotent."""
        try:
            self.core.shutdown()
            self._fail_all(EngineDeadError("engine shut down"))
        except RuntimeError:  # from __del__ after the event loop closed: no waiter is left to wake
            pass
        finally:
            self.executor.shutdown()

    def status(self) -> EngineStatus:
        return self.core.status()

    async def worker_pids(self) -> list[int]:
        return await self.executor.pids()

    # ---- requests --------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams):
        """Yield ``RequestOutput`` deltas until one has ``finish_reason``. Closing the iterator aborts the request.

        Raises ``EngineDeadError`` if the gang fails, ``QueueFullError`` if the replica is at capacity,
        ``InvalidRequestError`` for a reused id or a prompt that is empty or has ids outside the tokenizer's.
        """
        return self._generate(request_id, prompt_ids, params)

    async def _generate(self, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams,
                        report: bool = True):
        self.check_health()
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use (X-Request-Id must be unique)")
        # one bad prompt must not kill the gang (the OpenAI layer checks too; a handle or in-process caller may not)
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        check_token_ids(prompt_ids, self.vocab_size, "prompt")
        queue = self._streams[request_id] = asyncio.Queue()
        finished = False
        try:
            self.core.submit(request_id, tuple(prompt_ids), params, report)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the core dropped it (refused, or failed with the engine)
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if self._streams.get(request_id) is queue:
                del self._streams[request_id]
            if not finished:  # the caller went away: the core frees the row at its next step
                self.core.abort(request_id)

    # ---- the core's sink (called on the core's thread) ------------------------------------------
    def outputs(self, batch: Outputs) -> None:
        self._loop.call_soon_threadsafe(self._deliver, batch)

    def died(self, error: EngineDeadError) -> None:
        self._loop.call_soon_threadsafe(self._on_died, error)

    # ---- on this loop ----------------------------------------------------------------------
    def _deliver(self, batch: Outputs) -> None:
        for request_id, item in batch:
            queue = self._streams.get(request_id)
            if queue is not None:  # else its caller went away meanwhile
                queue.put_nowait(item)

    def _on_died(self, error: EngineDeadError) -> None:
        if self._dead is None:
            self._dead = error
        self._fail_all(error)  # requests the core had not admitted yet
        self._died.set()

    def _fail_all(self, error: EngineDeadError) -> None:
        for queue in list(self._streams.values()):
            queue.put_nowait(error)
