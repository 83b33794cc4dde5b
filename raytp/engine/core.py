"""The engine core: schedule → launch → finish over every live request of one replica, in a thread of its own.

vLLM v1's EngineCore: a busy loop that owns the scheduler, the driver's mirror of the ranks' batch
(``raytp.engine.step_builder``), the grammar matchers and the detokenizers, fed by requests and aborts and
emitting one batch of outputs per step. The serving side (``raytp.engine.engine.Engine``, on the replica's event
loop) never touches that state: it calls ``submit`` / ``abort`` (thread-safe; they run on the core's loop
between its awaits) and receives each step's outputs through its ``OutputSink`` (called on the core thread; the
engine hands them to its own loop with ``call_soon_threadsafe``, one wake-up per step). So a long prompt being
templated, a burst of requests, SSE encoding or Serve's own work never delay the next step, and a step never
waits for a consumer.

The core's thread runs an asyncio loop of its own only to drive the executor, whose contract is awaitable (Ray's
object refs; the liveness pings while a step runs). With async scheduling it sends step N + 1 before step N has
returned (``_launch``), then turns step N's tokens into outputs (``_finish``): detokenization, stop strings,
grammar advance, finish reasons and metrics for every row of the step, in one pass, once per step.

Failure: an ``EngineDeadError`` from the executor, or any bug in this loop, fails every live request with a
typed ``EngineDeadError`` (through the sink) and tells the sink the core died; requests submitted after that fail
at once. ``shutdown`` stops the loop and joins the thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Protocol

from raytp.engine.detokenizer import IncrementalDetokenizer
from raytp.engine.protocol import EngineStatus, Executor, RequestOutput
from raytp.engine.scheduler import SchedulerConfig, SchedulerOutput, Sequence
from raytp.engine.stats import EngineStats
from raytp.engine.step_builder import StepBuilder
from raytp.engine.structured import Grammars
from raytp.errors import EngineDeadError
from raytp.messages import SamplingParams

logger = logging.getLogger(__name__)

# A step's outputs: per request, its next delta or the error that ended it, in row order.
Outputs = list[tuple[str, "RequestOutput | BaseException"]]


class OutputSink(Protocol):
    """Where the core's results go. Both are called on the core's thread and must only hand off (never block)."""

    def outputs(self, batch: Outputs) -> None:
        """One step's outputs (or one request's rejection)."""

    def died(self, error: EngineDeadError) -> None:
        """The core can no longer serve: every live request has been sent ``error``."""


@dataclass
class _Live:
    seq: Sequence
    detok: IncrementalDetokenizer
    report: bool  # counted by stats and finished_counts (not the warm-up request)
    prompt_logprobs: dict[int, object] = field(default_factory=dict)  # position -> TokenLogprob, until sent
    sent_first: bool = False


@dataclass
class _Launched:
    """A step sent to the ranks: what was scheduled, the sequences it samples a token for (in row order), and the
    future of rank 0's ``StepOutput``."""

    out: SchedulerOutput
    sampled: list[Sequence]
    result: asyncio.Future


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class EngineCore:
    """``tokenizer``: this core's own (its thread alone decodes with it). ``scheduling``: the policy to build once
    ``start`` knows the KV blocks. ``stats``: the ``EngineStats`` observer, called on the core's thread."""

    def __init__(self, executor: Executor, tokenizer, scheduling: SchedulerConfig, *, seed: int = 0,
                 stats: EngineStats | None = None):
        self.executor = executor
        self.tokenizer = tokenizer
        self.scheduling = scheduling
        self.stats = stats or EngineStats()
        self.scheduler = None
        self.eos_token_id = tokenizer.eos_token_id
        self.grammars = Grammars(tokenizer)  # structured output: a matcher per constrained request
        self.steps = StepBuilder(self.grammars.allowed)  # the driver's mirror of the ranks' persistent batch
        self.finished_counts: Counter[str] = Counter()  # requests ended, by finish reason (incl. abort, error)
        self.dead: EngineDeadError | None = None
        self._live: dict[str, _Live] = {}
        self._seeds = random.Random(seed)
        self._sink: OutputSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    # ---- lifecycle (any thread) ----------------------------------------------------------------
    def start(self, num_blocks: int, sink: OutputSink) -> None:
        """Build the scheduler for ``num_blocks`` KV blocks and start the core's thread; returns once it runs."""
        self.scheduler = self.scheduling.build(num_blocks)
        self._sink = sink
        self._loop = asyncio.new_event_loop()
        running = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(running,), name="raytp-engine-core",
                                        daemon=True)
        self._thread.start()
        running.wait()

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread is not None and self._thread.is_alive() and \
            self._task is not None and not self._task.done()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the loop (its step in flight is cancelled) and join the thread. Idempotent; live requests are the
        caller's to fail. The executor is not shut down here."""
        if self.dead is None:
            self.dead = EngineDeadError("engine shut down")
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # already closed
            return
        if thread is not threading.current_thread():
            thread.join(timeout_s)

    def _thread_main(self, running: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run())
        loop.call_soon(running.set)
        try:
            loop.run_forever()
        finally:  # stopped: cancel what runs (the loop task, a step in flight) and let it clean up, then close
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=5))
            loop.close()

    # ---- requests (any thread) -----------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams,
               report: bool = True) -> None:
        """Queue a request (its outputs, or its rejection, come through the sink). Raises ``EngineDeadError`` if
        the core no longer runs. Its latencies count from now."""
        self._call(self._add, request_id, prompt_ids, params, report, time.monotonic())

    def abort(self, request_id: str) -> None:
        """The caller went away: free the request's row at the next step. Never raises."""
        try:
            self._call(self._abort, request_id)
        except EngineDeadError:
            pass

    def _call(self, fn, *args) -> None:
        if self.dead is not None:
            raise self.dead
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed between the check and the call
            raise self.dead or EngineDeadError("engine shut down") from None

    def status(self) -> EngineStatus:
        """A snapshot (read from another thread: counts may be a step apart)."""
        s = self.scheduler
        if s is None:
            return EngineStatus(0, 0, dict(self.finished_counts))
        return EngineStatus(s.num_running, s.num_waiting, dict(self.finished_counts), kv_cache_usage=s.kv.usage,
                            kv_cache_tokens=s.kv.capacity_tokens, num_preemptions=s.num_preemptions,
                            prefix_cache_hit_rate=s.kv.prefix_hit_rate,
                            prefix_cache_hit_tokens=s.kv.prefix_hit_tokens)

    # ---- on the core's loop --------------------------------------------------------------------
    def _add(self, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams, report: bool,
             arrival_s: float) -> None:
        if self.dead is not None:
            self._sink.outputs([(request_id, self.dead)])
            return
        if not params.greedy and params.seed is None:
            params = replace(params, seed=self._seeds.getrandbits(63))
        if params.min_tokens and self.eos_token_id is not None and not params.ignore_eos:
            params = replace(params, eos_token_ids=(self.eos_token_id,))
        seq = Sequence(request_id, prompt_ids, params, arrival_s=arrival_s)
        try:
            if params.grammar:
                self.grammars.add(request_id, params.grammar)
            self.scheduler.add(seq)  # QueueFullError / InvalidRequestError: the request's, not the engine's
        except Exception as e:  # noqa: BLE001 - whatever refuses one request is that request's error
            self.grammars.drop(request_id)
            self._sink.outputs([(request_id, e)])
            return
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, skip_special_tokens=params.skip_special_tokens,
                                       include_stop_str=params.include_stop_str_in_output)
        self._live[request_id] = _Live(seq, detok, report)
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is None:  # finished (its last output on its way) or never admitted
            return
        self.scheduler.abort(request_id)
        self.scheduler.release_finished()
        self._ended(live, "abort")

    def _ended(self, live: _Live, reason: str) -> None:
        """A request left the engine: count it, drop its state (its row leaves the ranks at the next schedule)."""
        seq = live.seq
        self._live.pop(seq.seq_id, None)
        self.grammars.drop(seq.seq_id)
        if live.report:
            self.finished_counts[reason] += 1
            self.stats.on_finished(reason, time.monotonic() - seq.arrival_s, len(seq.prompt_ids),
                                   seq.num_output_tokens)

    async def _run(self) -> None:
        """Launch a step, then finish the one before it (async scheduling: the ranks start step N + 1 as soon as
        step N ends, while this loop turns N's tokens into outputs), or finish each step before the next."""
        inflight: _Launched | None = None
        try:
            while True:
                busy, launched = self._launch()
                if launched is not None:  # one turn of this loop: the step's coroutine sends it to the ranks now,
                    await asyncio.sleep(0)  # not once the step before has been finished
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
                    await self._wake.wait()  # a submit sets it
        except EngineDeadError as e:
            self._die(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug here must not leave requests hanging
            logger.exception("engine core crashed")
            self._die(EngineDeadError(f"engine loop crashed: {type(e).__name__}: {e}"))
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
                if self._reported(seq):
                    self.stats.on_scheduled(now - seq.arrival_s)
        return out

    def _reported(self, seq: Sequence) -> bool:
        live = self._live.get(seq.seq_id)
        return live is not None and live.report

    async def _finish(self, launched: _Launched) -> None:
        """3. update: wait for a launched step's tokens, append them, emit the step's outputs, commit full blocks."""
        result = await launched.result
        for seq_id, first, entries in result.prompt_logprobs:  # echo: kept until the request's first output
            live = self._live.get(seq_id)
            if live is not None:
                for i, entry in enumerate(entries):  # a recomputation after preemption changes nothing
                    live.prompt_logprobs.setdefault(first + i, entry)
        assert len(result.tokens) == len(launched.sampled), "workers and scheduler disagree on the rows"
        for seq in launched.sampled:
            seq.num_inflight -= 1
        outputs = self._update(launched.sampled, result.tokens, result.logprobs or (None,) * len(launched.sampled))
        for seq, _ in launched.out.rows:
            self.scheduler.commit(seq)
        self.scheduler.release_finished()  # before the outputs leave: a finished request's blocks are free
        if outputs:
            self._sink.outputs(outputs)
        self.stats.on_step(self.scheduler.num_running, self.scheduler.num_waiting, self.scheduler.kv.usage)

    def _update(self, seqs: list[Sequence], tokens: tuple[int, ...], logprobs: tuple) -> Outputs:
        """Every sampled row's token, once per step: append, finish reasons, text, grammar; one output each."""
        outputs: Outputs = []
        first_s, gaps_s = [], []
        now = time.monotonic()
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            live = self._live.get(seq.seq_id)
            if seq.finished or live is None:  # finished by an earlier token, or its caller went away
                continue
            seq.append_token(token)
            if live.report:
                (gaps_s if seq.last_token_s is not None else first_s).append(now - (seq.last_token_s or
                                                                                    seq.arrival_s))
            seq.last_token_s = now
            params = seq.params
            # the sampler never picks EOS or a stop token before min_tokens; stop strings are not looked for then
            hit_eos = (token == self.eos_token_id and not params.ignore_eos) or token in params.stop_token_ids
            check_stop = seq.num_output_tokens >= params.min_tokens
            # a stop token's text (EOS: none unless special tokens are kept) only with include_stop_str_in_output
            keep = not hit_eos or params.include_stop_str_in_output
            delta, hit_stop = live.detok.add(token, check_stop and not hit_eos) if keep else ("", False)
            complete = bool(params.grammar) and self.grammars.accept(seq.seq_id, token)  # structured output done
            if hit_eos or hit_stop or complete:
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= params.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason and not hit_stop:
                delta += live.detok.flush()
            # one output per token, its text possibly empty (a token that completes no character, or text held
            # back while it may begin a stop string): streaming clients count one event per generated token
            outputs.append((seq.seq_id, RequestOutput(
                request_id=seq.seq_id, text=delta, token_ids=[token],
                num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=seq.num_output_tokens,
                finish_reason=seq.finish_reason, logprobs=[logprob] if params.logprobs is not None else None,
                prompt_logprobs=self._prompt_logprobs(live),
            )))
            live.sent_first = True
            if seq.finish_reason:
                self._ended(live, seq.finish_reason)
        if first_s or gaps_s:
            self.stats.on_tokens(first_s, gaps_s)
        return outputs

    @staticmethod
    def _prompt_logprobs(live: _Live) -> list | None:
        """On a request's first output, if it asked: an entry per prompt token after the first, in order."""
        if live.sent_first or live.seq.params.prompt_logprobs is None:
            return None
        return [live.prompt_logprobs.get(p) for p in range(1, len(live.seq.prompt_ids))]

    def _die(self, error: EngineDeadError) -> None:
        self.dead = error
        if self.scheduler is not None:
            self.scheduler.drain()
        failed = []
        for live in list(self._live.values()):
            live.seq.finish_reason = live.seq.finish_reason or "error"
            self._ended(live, "error")
            failed.append((live.seq.seq_id, error))
        if failed:
            self._sink.outputs(failed)
        self._sink.died(error)
