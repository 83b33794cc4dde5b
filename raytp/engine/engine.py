"""The engine loop: schedule → execute → update, over every live request of one replica.

One asyncio task owns the gang: it alone sends steps to the executor, so ranks see one
ordered command stream and requests never interleave wrongly. Requests enter through
``generate`` (an async iterator of ``RequestOutput`` deltas) and leave when finished,
aborted (the iterator is closed) or failed (``EngineDeadError``). ``Engine`` is the
``raytp.engine.protocol.EngineClient`` the server uses; its executor is any
``raytp.engine.protocol.Executor``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import replace

from raytp.engine.detokenizer import IncrementalDetokenizer
from raytp.engine.protocol import EngineStatus, Executor, RequestOutput
from raytp.engine.scheduler import SchedulerOutput, Sequence, make_scheduler
from raytp.engine.stats import EngineStats
from raytp.errors import EngineDeadError, InvalidRequestError
from raytp.messages import SamplingParams, StepInput

logger = logging.getLogger(__name__)


class _Stream:
    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer):
        self.seq = seq
        self.detok = detok
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending_ids: list[int] = []  # tokens whose text is still held back


def make_engine(config, executor: Executor, tokenizer, stats: EngineStats | None = None) -> Engine:
    """The engine a ``ResolvedConfig`` describes, over ``executor``."""
    scheduler = make_scheduler(config.scheduling, config.max_num_seqs, config.max_queue_size,
                               config.max_num_batched_tokens)
    return Engine(executor, tokenizer, scheduler, seed=config.seed, stats=stats)


class Engine:
    """Owns a scheduler and an executor. ``scheduler`` is a ``raytp.engine.scheduler`` policy; ``stats`` an
    ``EngineStats`` observer (the warm-up request is not reported to it, nor counted in ``status()``)."""

    def __init__(self, executor: Executor, tokenizer, scheduler, *, seed: int = 0, stats: EngineStats | None = None):
        self.executor = executor
        self.stats = stats or EngineStats()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.eos_token_id = tokenizer.eos_token_id
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._dead: EngineDeadError | None = None
        self._died = asyncio.Event()
        self._seeds = random.Random(seed)
        self.load_reports = []
        self.finished_counts: Counter[str] = Counter()  # requests ended, by finish reason (incl. abort, error)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, warmup: bool = True) -> None:
        """Start the gang, run the loop, and (optionally) prove it with a 2-token warm-up generation."""
        self.load_reports = await self.executor.start()
        self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())
        if warmup:  # proves the whole path once; an operator's counters start after it
            prompt = tuple(self.tokenizer.encode("warm up", add_special_tokens=False)) or (0,)
            stats, self.stats = self.stats, EngineStats()
            try:
                async for _ in self.generate("warmup", prompt, SamplingParams(max_tokens=2, temperature=0.0,
                                                                              ignore_eos=True)):
                    pass
            finally:
                self.stats = stats
                self.finished_counts.clear()

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the gang or the loop has failed."""
        if self._dead is not None:
            raise self._dead
        if self._loop_task is None or self._loop_task.done():
            raise EngineDeadError("engine loop is not running")

    async def wait_dead(self) -> EngineDeadError:
        """Return the error once the gang or the loop has failed (never returns while healthy)."""
        await self._died.wait()
        return self._dead

    def shutdown(self) -> None:
        """Fail every in-flight request and free the gang. Idempotent."""
        try:
            if self._loop_task:
                self._loop_task.cancel()
            self._fail_all(EngineDeadError("engine shut down"))
        except RuntimeError:  # from __del__ after the event loop closed: no task or waiter is left to wake
            pass
        finally:
            self.executor.shutdown()

    def status(self) -> EngineStatus:
        return EngineStatus(self.scheduler.num_running, self.scheduler.num_waiting, dict(self.finished_counts))

    async def worker_pids(self) -> list[int]:
        return await self.executor.pids()

    # ---- requests --------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams):
        """Yield ``RequestOutput`` deltas until one has ``finish_reason``. Closing the iterator aborts the request.

        Raises ``EngineDeadError`` if the gang fails, ``QueueFullError`` if the replica is at capacity.
        """
        self.check_health()
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use (X-Request-Id must be unique)")
        if not params.greedy and params.seed is None:
            params = replace(params, seed=self._seeds.getrandbits(63))
        seq = Sequence(request_id, tuple(prompt_ids), params)
        self.scheduler.add(seq)
        stream = self._streams[request_id] = _Stream(seq, IncrementalDetokenizer(self.tokenizer, params.stop))
        self._wake.set()
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not seq.finished:  # the caller went away: free the row at the next step
                self.scheduler.abort(request_id)
            reason = seq.finish_reason or "abort"
            self.finished_counts[reason] += 1
            self.stats.on_finished(reason, time.monotonic() - seq.arrival_s, len(seq.prompt_ids), len(seq.output_ids))
            self._streams.pop(request_id, None)

    # ---- the loop --------------------------------------------------------------------------
    async def _run_loop(self) -> None:
        try:
            while True:
                if not await self.step():
                    self._wake.clear()
                    await self._wake.wait()
        except EngineDeadError as e:
            self._dead = e
            self._fail_all(e)
            self._died.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug here must not leave requests hanging
            logger.exception("engine loop crashed")
            self._dead = EngineDeadError(f"engine loop crashed: {type(e).__name__}: {e}")
            self._fail_all(self._dead)
            self._died.set()

    async def step(self) -> bool:
        """One iteration. Returns False when there was nothing to do."""
        out = self.scheduler.schedule()  # 1. schedule
        if out.kind == "idle":
            return False
        new = tuple(s.to_input() for s in out.seqs) if out.kind == "prefill" else ()
        if new:
            now = time.monotonic()
            for s in out.seqs:
                self.stats.on_scheduled(now - s.arrival_s)
        # 2. execute: the same step to every rank, one round trip
        result = await self.executor.step(StepInput(out.finished_ids, new, out.kind == "decode"))
        if out.kind != "release":
            assert len(result.tokens) == len(out.seqs), "workers and scheduler disagree on the rows"
            self._update(out, result.tokens)  # 3. update
        self.stats.on_step(self.scheduler.num_running, self.scheduler.num_waiting)
        return True

    def _update(self, out: SchedulerOutput, tokens: tuple[int, ...]) -> None:
        for seq, token in zip(out.seqs, tokens):
            if seq.finished:
                continue
            stream = self._streams.get(seq.seq_id)
            if stream is None:  # its caller went away between steps
                seq.finish_reason = "abort"
                continue
            seq.output_ids.append(token)
            now = time.monotonic()
            self.stats.on_token(now - (seq.last_token_s or seq.arrival_s), first=seq.last_token_s is None)
            seq.last_token_s = now
            stream.pending_ids.append(token)
            hit_eos = token == self.eos_token_id and not seq.params.ignore_eos
            delta, hit_stop = ("", False) if hit_eos else stream.detok.add(token)
            if hit_eos or hit_stop:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason and not hit_stop:
                delta += stream.detok.flush()
            if delta or seq.finish_reason:
                stream.queue.put_nowait(RequestOutput(
                    request_id=seq.seq_id, text=delta, token_ids=stream.pending_ids,
                    num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
                    finish_reason=seq.finish_reason,
                ))
                stream.pending_ids = []

    def _fail_all(self, error: EngineDeadError) -> None:
        self.scheduler.drain()
        for stream in list(self._streams.values()):
            stream.seq.finish_reason = stream.seq.finish_reason or "error"
            stream.queue.put_nowait(error)
