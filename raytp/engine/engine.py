"""The engine loop: schedule → execute → update, over every live request of one replica.

One asyncio task owns the gang: it alone sends steps to the executor, so ranks see one
ordered command stream and requests never interleave wrongly. With async scheduling it sends
step N + 1 before step N has returned (``_launch``), then turns step N's tokens into outputs
(``_finish``): rows whose input is step N's token carry ``PENDING_TOKEN``, which the ranks fill
in. Requests enter through
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
from dataclasses import dataclass, replace

from raytp.engine.detokenizer import IncrementalDetokenizer
from raytp.engine.protocol import EngineStatus, Executor, RequestOutput
from raytp.engine.scheduler import SchedulerConfig, SchedulerOutput, Sequence
from raytp.engine.stats import EngineStats
from raytp.engine.step_builder import StepBuilder
from raytp.engine.structured import Grammars
from raytp.errors import ConfigError, EngineDeadError, InvalidRequestError, check_token_ids
from raytp.messages import SamplingParams

logger = logging.getLogger(__name__)


class _Stream:
    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer):
        self.seq = seq
        self.detok = detok
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_logprobs: dict[int, object] = {}  # prompt position -> TokenLogprob (echo), until sent
        self.sent_first = False


@dataclass
class _Launched:
    """A step sent to the ranks: what was scheduled, the sequences it samples a token for (in row order), and
    the future of rank 0's ``StepOutput``."""

    out: SchedulerOutput
    sampled: list[Sequence]
    result: asyncio.Future


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def make_engine(config, executor: Executor, tokenizer, stats: EngineStats | None = None) -> Engine:
    """The engine a ``ResolvedConfig`` describes, over ``executor``."""
    return Engine(executor, tokenizer, SchedulerConfig.of(config), seed=config.seed, stats=stats)


class Engine:
    """Owns a scheduler and an executor. ``scheduling`` says which ``raytp.engine.scheduler`` policy to build
    once the gang reports its KV blocks; ``stats`` is an ``EngineStats`` observer (the warm-up request is not
    reported to it, nor counted in ``status()``)."""

    def __init__(self, executor: Executor, tokenizer, scheduling: SchedulerConfig | None = None, *, seed: int = 0,
                 stats: EngineStats | None = None):
        self.executor = executor
        self.stats = stats or EngineStats()
        self.tokenizer = tokenizer
        self.scheduling = scheduling or SchedulerConfig()
        self.scheduler = None
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)
        self.grammars = Grammars(tokenizer)  # structured output: a matcher per constrained request
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._dead: EngineDeadError | None = None
        self._died = asyncio.Event()
        self._seeds = random.Random(seed)
        self.load_reports = []
        self.steps = StepBuilder(self.grammars.allowed)  # the driver's mirror of the ranks' persistent batch
        self.finished_counts: Counter[str] = Counter()  # requests ended, by finish reason (incl. abort, error)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, warmup: bool = True) -> None:
        """Start the gang, run the loop, and (optionally) prove it with a 2-token warm-up generation. Raises
        ``ConfigError`` if the ranks' KV budget cannot hold a single block (the gang is shut down)."""
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
        self.scheduler = self.scheduling.build(num_blocks)
        capacity = self.scheduler.kv.capacity_tokens
        logger.info("raytp: KV cache of %d blocks x %d tokens = %d tokens per replica (prefix caching %s)",
                    num_blocks - 1, bs, capacity, "on" if self.scheduling.enable_prefix_caching else "off")
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
        s = self.scheduler
        if s is None:
            return EngineStatus(0, 0, dict(self.finished_counts))
        return EngineStatus(s.num_running, s.num_waiting, dict(self.finished_counts), kv_cache_usage=s.kv.usage,
                            kv_cache_tokens=s.kv.capacity_tokens, num_preemptions=s.num_preemptions,
                            prefix_cache_hit_rate=s.kv.prefix_hit_rate,
                            prefix_cache_hit_tokens=s.kv.prefix_hit_tokens)

    async def worker_pids(self) -> list[int]:
        return await self.executor.pids()

    # ---- requests --------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams):
        """Yield ``RequestOutput`` deltas until one has ``finish_reason``. Closing the iterator aborts the request.

        Raises ``EngineDeadError`` if the gang fails, ``QueueFullError`` if the replica is at capacity,
        ``InvalidRequestError`` for a reused id or a prompt that is empty or has ids outside the tokenizer's.
        """
        self.check_health()
        if self.scheduler is None:
            raise EngineDeadError("engine is not started")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use (X-Request-Id must be unique)")
        # one bad prompt must not kill the gang (the OpenAI layer checks too; a handle or in-process caller may not)
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        check_token_ids(prompt_ids, self.vocab_size, "prompt")
        if not params.greedy and params.seed is None:
            params = replace(params, seed=self._seeds.getrandbits(63))
        if params.min_tokens and self.eos_token_id is not None and not params.ignore_eos:
            params = replace(params, eos_token_ids=(self.eos_token_id,))
        seq = Sequence(request_id, tuple(prompt_ids), params)
        if params.grammar:
            self.grammars.add(request_id, params.grammar)
        try:
            self.scheduler.add(seq)
        except BaseException:
            self.grammars.drop(request_id)
            raise
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, skip_special_tokens=params.skip_special_tokens,
                                       include_stop_str=params.include_stop_str_in_output)
        stream = self._streams[request_id] = _Stream(seq, detok)
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
            self.stats.on_finished(reason, time.monotonic() - seq.arrival_s, len(seq.prompt_ids), seq.num_output_tokens)
            self._streams.pop(request_id, None)
            self.grammars.drop(request_id)

    # ---- the loop --------------------------------------------------------------------------
    async def _run_loop(self) -> None:
        """Launch a step, then finish the one before it (async scheduling: the ranks start step N + 1 as soon as
        step N ends, while the driver turns N's tokens into outputs), or finish each step before the next."""
        inflight: _Launched | None = None
        try:
            while True:
                busy, launched = self._launch()
                if inflight is not None:  # its tokens may finish requests or make others schedulable: loop again
                    await self._finish(inflight)
                    inflight, busy = None, True
                if launched is not None:
                    if self.scheduling.pipelined:
                        inflight = launched
                    else:
                        await self._finish(launched)
                if not busy and inflight is None:
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
        finally:
            if inflight is not None:  # its outcome no longer matters (the gang died or the engine shut down)
                inflight.result.cancel()
                inflight.result.add_done_callback(_retrieve)

    def _launch(self) -> tuple[bool, _Launched | None]:
        """Schedule a step and send it to the ranks. Returns (whether there was anything to do, the step sent:
        None when nothing needed computing)."""
        out = self._schedule()  # 1. schedule
        if out.idle:
            return False, None
        step, sampled = self.steps.build(out)
        if step is None:
            return True, None  # only departures: they ride on the next step that computes something
        result = asyncio.ensure_future(self.executor.step(step))  # 2. execute (its result awaited by _finish)
        self.scheduler.advance(out)  # the next step schedules what follows these tokens
        for seq in sampled:
            seq.num_inflight += 1
        return True, _Launched(out, sampled, result)

    def _schedule(self) -> SchedulerOutput:
        """The scheduler's next step, its preemptions, prefix lookups and first schedulings reported."""
        kv = self.scheduler.kv
        queried, hits = kv.prefix_queried_tokens, kv.prefix_hit_tokens
        out = self.scheduler.schedule()
        if out.num_preempted:
            self.stats.on_preempted(out.num_preempted)
        if kv.prefix_queried_tokens != queried:
            self.stats.on_prefix_lookup(kv.prefix_queried_tokens - queried, kv.prefix_hit_tokens - hits)
        now = time.monotonic()
        for seq, _ in out.rows:
            if seq.scheduled_s is None:
                seq.scheduled_s = now
                self.stats.on_scheduled(now - seq.arrival_s)
        return out

    async def _finish(self, launched: _Launched) -> None:
        """3. update: wait for a launched step's tokens, append them, emit outputs, commit the full blocks."""
        result = await launched.result
        for seq_id, first, entries in result.prompt_logprobs:  # echo: kept until the request's first output
            stream = self._streams.get(seq_id)
            if stream is not None:
                for i, entry in enumerate(entries):  # a recomputation after preemption changes nothing
                    stream.prompt_logprobs.setdefault(first + i, entry)
        assert len(result.tokens) == len(launched.sampled), "workers and scheduler disagree on the rows"
        for seq in launched.sampled:
            seq.num_inflight -= 1
        self._update(launched.sampled, result.tokens, result.logprobs or (None,) * len(launched.sampled))
        for seq, _ in launched.out.rows:
            self.scheduler.commit(seq)
        self.stats.on_step(self.scheduler.num_running, self.scheduler.num_waiting, self.scheduler.kv.usage)

    def _update(self, seqs: list[Sequence], tokens: tuple[int, ...], logprobs: tuple) -> None:
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            if seq.finished:
                continue
            stream = self._streams.get(seq.seq_id)
            if stream is None:  # its caller went away between steps
                seq.finish_reason = "abort"
                continue
            seq.append_token(token)
            now = time.monotonic()
            self.stats.on_token(now - (seq.last_token_s or seq.arrival_s), first=seq.last_token_s is None)
            seq.last_token_s = now
            params = seq.params
            # the sampler never picks EOS or a stop token before min_tokens; stop strings are not looked for then
            hit_eos = (token == self.eos_token_id and not params.ignore_eos) or token in params.stop_token_ids
            check_stop = seq.num_output_tokens >= params.min_tokens
            # a stop token's text (EOS: none unless special tokens are kept) only with include_stop_str_in_output
            keep = not hit_eos or params.include_stop_str_in_output
            delta, hit_stop = stream.detok.add(token, check_stop and not hit_eos) if keep else ("", False)
            complete = bool(params.grammar) and self.grammars.accept(seq.seq_id, token)  # structured output done
            if hit_eos or hit_stop or complete:
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= params.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason and not hit_stop:
                delta += stream.detok.flush()
            # one output per token, its text possibly empty (a token that completes no character, or text held
            # back while it may begin a stop string): streaming clients count one event per generated token
            stream.queue.put_nowait(RequestOutput(
                request_id=seq.seq_id, text=delta, token_ids=[token],
                num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=seq.num_output_tokens,
                finish_reason=seq.finish_reason, logprobs=[logprob] if params.logprobs is not None else None,
                prompt_logprobs=self._prompt_logprobs(stream),
            ))
            stream.sent_first = True

    @staticmethod
    def _prompt_logprobs(stream: _Stream) -> list | None:
        """On a request's first output, if it asked: an entry per prompt token after the first, in order."""
        if stream.sent_first or stream.seq.params.prompt_logprobs is None:
            return None
        return [stream.prompt_logprobs.get(p) for p in range(1, len(stream.seq.prompt_ids))]

    def _fail_all(self, error: EngineDeadError) -> None:
        if self.scheduler is not None:
            self.scheduler.drain()
        for stream in list(self._streams.values()):
            stream.seq.finish_reason = stream.seq.finish_reason or "error"
            stream.queue.put_nowait(error)
