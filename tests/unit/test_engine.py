"""The engine loop against a scripted executor (``raytp.testing``): no Ray, no model weights."""

import asyncio

import pytest

from raytp.engine.engine import Engine
from raytp.engine.scheduler import SchedulerConfig
from raytp.engine.stats import EngineStats
from raytp.errors import EngineDeadError, QueueFullError
from raytp.messages import SamplingParams
from raytp.testing import ScriptedExecutor


async def collect(engine, rid, prompt, params):
    outs = [o async for o in engine.generate(rid, prompt, params)]
    return "".join(o.text for o in outs), outs[-1]


def make(tok, scripts, **kw):
    # steps of a millisecond: the core runs in its own thread, and a caller's abort or a new request reaches it
    # within a step or two of real time (instant steps would let it run hundreds meanwhile)
    ex = ScriptedExecutor(scripts=scripts, fail_after_steps=kw.pop("fail_after", None), step_delay_s=0.001)
    scheduling = SchedulerConfig(max_num_seqs=kw.pop("max_num_seqs", 4), max_queue_size=kw.pop("max_queue_size", 16),
                                 max_num_batched_tokens=64)
    return Engine(ex, tok, scheduling), ex


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_finish_reasons_and_usage(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    scripts = {1: ids(tok, "the model serves") + [eos], 2: ids(tok, "requests arrive stream")}

    async def main():
        engine, ex = make(tok, scripts)
        await engine.start(warmup=False)
        (t1, o1), (t2, o2), (t3, o3) = await asyncio.gather(
            collect(engine, "a", (1, 9), SamplingParams(max_tokens=50, temperature=0)),
            collect(engine, "b", (2,), SamplingParams(max_tokens=3, temperature=0)),
            collect(engine, "c", (2, 5, 5), SamplingParams(max_tokens=50, temperature=0, stop=("arrive",))),
        )
        assert (t1, o1.finish_reason) == ("the model serves", "stop")
        assert o1.num_prompt_tokens == 2 and o1.num_output_tokens == len(scripts[1])
        assert o2.finish_reason == "length" and o2.num_output_tokens == 3
        assert tok.decode(scripts[2][:3]) == t2
        assert (t3, o3.finish_reason) == ("requests ", "stop")
        assert ex.steps[0] == "prefill" and "decode" in ex.steps
        engine.shutdown()
        assert ex.shut

    asyncio.run(main())


def test_ignore_eos_runs_to_max_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    scripts = {1: [tok.eos_token_id]}

    async def main():
        engine, _ = make(tok, scripts)
        await engine.start(warmup=False)
        _, last = await collect(engine, "a", (1,), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        assert last.finish_reason == "length" and last.num_output_tokens == 5
        _, last = await collect(engine, "b", (1,), SamplingParams(max_tokens=5, temperature=0))
        assert last.finish_reason == "stop" and last.num_output_tokens == 1
        engine.shutdown()

    asyncio.run(main())


def test_gang_failure_fails_every_request_and_health(tiny_tokenizer):
    tok = tiny_tokenizer
    scripts = {1: ids(tok, "the model serves tokens across ranks") * 10}

    async def main():
        engine, _ = make(tok, scripts, fail_after=3, max_num_seqs=1)
        await engine.start(warmup=False)
        results = await asyncio.wait_for(asyncio.gather(
            *(collect(engine, f"r{i}", (1,), SamplingParams(max_tokens=100, temperature=0)) for i in range(3)),
            return_exceptions=True), timeout=5)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        with pytest.raises(EngineDeadError):
            engine.check_health()
        with pytest.raises(EngineDeadError):
            await collect(engine, "late", (1,), SamplingParams(max_tokens=1, temperature=0))

    asyncio.run(main())


def test_a_gang_that_dies_while_idle_is_found_by_probe(tiny_tokenizer):
    """No request reaches a gang that died between requests: ``probe`` (Serve's health check) asks the ranks,
    fails the engine and wakes ``wait_dead`` (the replica's watchdog), so the replica is replaced before a
    request is routed to it."""
    async def main():
        engine, ex = make(tiny_tokenizer, {})
        await engine.start(warmup=False)
        await engine.probe()  # alive: nothing raised
        watchdog = asyncio.ensure_future(engine.wait_dead())
        ex._dead = "rank 1 killed"  # what a rank's ping would now report
        with pytest.raises(EngineDeadError, match="rank 1 killed"):
            await engine.probe()
        assert isinstance(await asyncio.wait_for(watchdog, 1), EngineDeadError)
        with pytest.raises(EngineDeadError):
            engine.check_health()
        with pytest.raises(EngineDeadError):
            await collect(engine, "late", (1,), SamplingParams(max_tokens=1, temperature=0))
        engine.shutdown()

    asyncio.run(main())


def test_queue_full_is_typed(tiny_tokenizer):
    tok = tiny_tokenizer

    async def main():
        engine, _ = make(tok, {1: [5] * 100}, max_num_seqs=1, max_queue_size=1)
        await engine.start(warmup=False)
        long = asyncio.ensure_future(collect(engine, "a", (1,), SamplingParams(max_tokens=60, temperature=0)))
        await asyncio.sleep(0.01)  # "a" is running; "b" fills the queue
        waiting = asyncio.ensure_future(collect(engine, "b", (1,), SamplingParams(max_tokens=2, temperature=0)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await collect(engine, "c", (1,), SamplingParams(max_tokens=2, temperature=0))
        assert (await long)[1].num_output_tokens == 60
        assert (await waiting)[1].num_output_tokens == 2
        engine.shutdown()

    asyncio.run(main())


def test_closing_the_stream_aborts(tiny_tokenizer):
    tok = tiny_tokenizer

    async def main():
        engine, ex = make(tok, {1: ids(tok, "the model ") * 50}, max_num_seqs=1)
        await engine.start(warmup=False)
        gen = engine.generate("a", (1,), SamplingParams(max_tokens=500, temperature=0))
        await gen.__anext__()
        await gen.aclose()
        # the aborted request's batch ends at the next step; a new request then runs
        _, last = await asyncio.wait_for(collect(engine, "b", (1,), SamplingParams(max_tokens=2, temperature=0)), 5)
        assert last.num_output_tokens == 2
        assert ex.steps.count("decode") < 20
        engine.shutdown()

    asyncio.run(main())


class RecordingStats(EngineStats):
    def __init__(self):
        self.steps, self.queued, self.first, self.gaps, self.finished = [], [], [], [], []

    def on_step(self, num_running, num_waiting, kv_cache_usage):
        self.steps.append((num_running, num_waiting))

    def on_scheduled(self, queue_s):
        self.queued.append(queue_s)

    def on_tokens(self, first_s, gaps_s):
        self.first += first_s
        self.gaps += gaps_s

    def on_finished(self, reason, e2e_s, num_prompt_tokens, num_output_tokens):
        self.finished.append((reason, num_prompt_tokens, num_output_tokens, e2e_s))


def test_stats_hooks_see_every_token_and_finish(tiny_tokenizer):
    tok = tiny_tokenizer
    scripts = {1: ids(tok, "the model serves tokens across ranks"), 2: ids(tok, "requests arrive")}
    stats = RecordingStats()

    async def main():
        ex = ScriptedExecutor(scripts=scripts, step_delay_s=0.001)
        engine = Engine(ex, tok, SchedulerConfig("continuous", 1, 16, 64), stats=stats)  # 1 slot: b queues behind a
        await engine.start(warmup=False)
        await asyncio.gather(
            collect(engine, "a", (1, 7, 7), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)),
            collect(engine, "b", (2,), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
        )
        engine.shutdown()

    asyncio.run(main())
    assert len(stats.first) == 2 and len(stats.gaps) == (5 - 1) + (3 - 1)  # one TTFT per request, then gaps
    assert len(stats.queued) == 2 and stats.queued[1] >= stats.queued[0]  # b waited for a's slot
    assert sorted((r, p, n) for r, p, n, _ in stats.finished) == [("length", 1, 3), ("length", 3, 5)]
    assert all(e2e > 0 for *_, e2e in stats.finished)
    assert max(r for r, _ in stats.steps) == 1 and any(w == 1 for _, w in stats.steps)
    assert stats.steps[-1] == (0, 0)


def test_warmup_is_not_reported(tiny_tokenizer):
    stats = RecordingStats()

    async def main():
        engine = Engine(ScriptedExecutor(), tiny_tokenizer, SchedulerConfig("continuous", 2, 4, 64), stats=stats)
        await engine.start()  # with the 2-token warm-up generation
        assert stats.first == stats.gaps == stats.finished == stats.queued == []
        assert engine.status().num_finished == {}
        await collect(engine, "a", (3,), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        assert engine.status().num_finished == {"length": 1} and len(stats.finished) == 1
        engine.shutdown()

    asyncio.run(main())


def test_ranks_get_a_sequence_once_then_only_deltas(tiny_tokenizer):
    """The persistent batch: a request's parameters and block table reach the ranks once (again only after a
    preemption freed its blocks), rows carry only the blocks gained since, departures ride on the next step that
    computes something (never a round trip of their own), and after every step the ranks' tables equal the
    driver's; outputs under preemption equal outputs alone."""
    tok = tiny_tokenizer
    sent, mismatches = [], []
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    prompts = [tuple(range(10 + i, 16 + i)) for i in range(3)]

    async def run(concurrent: bool):
        ex = ScriptedExecutor(num_kv_blocks=9, block_size=4)  # 8 usable blocks of 4: three 20-token requests preempt
        engine = Engine(ex, tok, SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=8, block_size=4))
        real_step = ex.step

        async def step(s):
            driver = {seq.seq_id: list(seq.kv.table) for seq in engine.scheduler.running}
            out = await real_step(s)
            if concurrent:
                sent.append(s)
                live = ex.requests.live
                mismatches.extend(r.handle for r in s.rows if live[r.handle].table != driver[live[r.handle].seq_id])
            return out

        ex.step = step
        await engine.start(warmup=False)
        try:
            if concurrent:
                return await asyncio.gather(*(collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts))), \
                    engine.status()
            return [await collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts)], engine.status()
        finally:
            engine.shutdown()

    alone, _ = asyncio.run(run(False))
    together, status = asyncio.run(run(True))
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert status.num_preemptions > 0 and not mismatches
    joins = [n.seq_id for s in sent for n in s.new_requests]
    assert sorted(set(joins)) == ["r0", "r1", "r2"] and len(joins) == 3 + status.num_preemptions
    assert all(s.rows for s in sent), "no step without rows (departures wait for the next one)"
    handles = [n.handle for s in sent for n in s.new_requests]
    left = [h for s in sent for h in s.finished]
    assert len(left) >= status.num_preemptions and all(left.count(h) <= handles.count(h) for h in left)
    assert max(handles) < 3, "handles of sequences that left are reused: they stay small"
    grown = [r for s in sent for r in s.rows if r.new_blocks]
    assert grown and all(len(r.new_blocks) <= 2 for r in grown), "rows carry only the blocks they gained"


def test_every_token_is_one_output_even_when_its_text_is_held_back(tiny_tokenizer):
    """Streaming clients count one event per generated token: a token whose text waits (it may begin a stop string,
    or completes no character) is still an output, with empty text; the texts add up to the whole answer."""
    tok = tiny_tokenizer
    answer = ids(tok, "the model serves requests fast")

    async def main():
        engine, _ = make(tok, {1: answer})
        await engine.start(warmup=False)
        params = SamplingParams(max_tokens=len(answer), temperature=0, ignore_eos=True, stop=("requests arrive",))
        outs = [o async for o in engine.generate("a", (1,), params)]
        engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert [t for o in outs for t in o.token_ids] == answer and all(len(o.token_ids) == 1 for o in outs)
    assert any(o.text == "" for o in outs[:-1]), "'requests' waited while it could begin the stop string"
    assert "".join(o.text for o in outs) == tok.decode(answer)


@pytest.mark.parametrize("seed", range(4))
def test_async_scheduling_outputs_equal_synchronous(tiny_tokenizer, seed):
    """Async scheduling (step N + 1 sent while step N runs) changes no output: random requests under a KV budget
    that preempts and a token budget that chunks prompts, with stop strings, a grammar, seeded sampling, max_tokens
    and an abort, give the same tokens, texts and finish reasons as one step at a time; nothing is emitted after a
    request finished, and async steps do overlap (a step is sent before the one before it returned)."""
    import random

    from raytp.engine.structured import grammar_of
    from raytp.testing import plain_token_ids

    tok = tiny_tokenizer
    rng = random.Random(seed)
    vocab = plain_token_ids(tok)
    grammar = grammar_of("json_object", None, "response_format")
    requests = []
    for i in range(8):
        prompt = tuple(rng.choice(vocab) for _ in range(rng.randint(1, 30)))
        params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 0.8]),
                                seed=rng.randint(0, 99), ignore_eos=rng.random() < 0.5,
                                grammar=grammar if i == 3 else None)
        requests.append((f"r{i}", prompt, params))

    async def run(pipelined: bool, stops: dict[str, tuple[str, ...]]):
        ex = ScriptedExecutor(vocab, num_kv_blocks=17, block_size=4, step_delay_s=0.001)  # 16 blocks of 4: preemption
        engine = Engine(ex, tok, SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=12, block_size=4,
                                                 async_scheduling=pipelined))
        in_flight, overlapped, real_step = [0], [0], ex.step

        async def step(s):
            in_flight[0] += 1
            overlapped[0] = max(overlapped[0], in_flight[0])
            try:
                return await real_step(s)
            finally:
                in_flight[0] -= 1

        ex.step = step
        await engine.start(warmup=False)

        async def one(rid, prompt, params):
            params = replace(params, stop=stops.get(rid, ()))
            outs = []
            async for out in engine.generate(rid, prompt, params):
                outs.append(out)
                if rid == "r5" and len(outs) == 3:
                    break  # the caller goes away: the request is aborted
            return [o.token_ids[0] for o in outs], "".join(o.text for o in outs), outs[-1].finish_reason

        try:
            results = await asyncio.gather(*(one(*r) for r in requests))
            status = engine.status()
        finally:
            engine.shutdown()
        return dict(zip([r[0] for r in requests], results)), overlapped[0], status

    from dataclasses import replace

    plain, _, _ = asyncio.run(run(False, {}))
    # stop strings that really occur: a piece of the middle of some outputs
    stops = {rid: (text[len(text) // 2:len(text) // 2 + 2],) for rid, (_, text, _) in plain.items()
             if len(text) >= 6 and rid in ("r0", "r1", "r2")}
    sync, sync_overlap, _ = asyncio.run(run(False, stops))
    pipelined, overlap, status = asyncio.run(run(True, stops))
    assert pipelined == sync
    assert sync_overlap == 1 and overlap == 2, "async scheduling sends a step while the one before runs"
    assert any(r[2] == "stop" for rid, r in sync.items() if rid in stops), "a stop string ended some request"
    assert status.num_preemptions > 0, "the KV budget preempted sequences (some with a token in flight)"


def test_prompt_ids_outside_the_vocabulary_fail_the_request_not_the_gang(tiny_tokenizer):
    """A prompt with an id the model has no embedding for (a handle caller's, past the OpenAI layer's checks) is
    refused with a typed error before it reaches the ranks; the engine keeps serving."""
    from raytp.errors import InvalidRequestError

    tok = tiny_tokenizer

    async def main():
        engine, ex = make(tok, {})
        await engine.start(warmup=False)
        try:
            for bad in ((len(tok),), (-1,), ()):
                with pytest.raises(InvalidRequestError) as e:
                    await collect(engine, f"bad{bad}", bad, SamplingParams(max_tokens=2, temperature=0))
                assert e.value.param == "prompt"
            steps_before = list(ex.steps)
            text, last = await collect(engine, "ok", (5, 6), SamplingParams(max_tokens=3, temperature=0))
            return last.num_output_tokens, steps_before
        finally:
            engine.shutdown()

    n, steps_before = asyncio.run(main())
    assert steps_before == [], "no bad prompt reached the ranks"
    assert n == 3, "the engine still serves"


# ---- the core on its own thread: nothing hangs, the serving loop never waits on a step -------------------------------
def test_shutdown_fails_every_waiting_request_and_later_ones(tiny_tokenizer):
    tok = tiny_tokenizer

    async def main():
        engine, ex = make(tok, {1: [5] * 400}, max_num_seqs=2)
        await engine.start(warmup=False)
        runs = [asyncio.ensure_future(collect(engine, f"r{i}", (1,), SamplingParams(max_tokens=400, temperature=0)))
                for i in range(4)]  # two running, two waiting
        await asyncio.sleep(0.02)
        engine.shutdown()
        results = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), timeout=5)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert ex.shut and not engine.core._thread.is_alive()
        with pytest.raises(EngineDeadError):
            engine.check_health()
        with pytest.raises(EngineDeadError):
            await collect(engine, "late", (1,), SamplingParams(max_tokens=1, temperature=0))
        engine.shutdown()  # idempotent

    asyncio.run(main())


def test_a_bug_in_the_core_fails_every_request_with_a_typed_error(tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer

    async def main():
        engine, _ = make(tok, {1: [5] * 100}, max_num_seqs=1)
        await engine.start(warmup=False)
        real_update, calls = engine.core._update, [0]

        def update(*args):
            calls[0] += 1
            if calls[0] == 3:
                raise KeyError("a bug")
            return real_update(*args)

        monkeypatch.setattr(engine.core, "_update", update)
        results = await asyncio.wait_for(asyncio.gather(
            *(collect(engine, f"r{i}", (1,), SamplingParams(max_tokens=50, temperature=0)) for i in range(3)),
            return_exceptions=True), timeout=5)
        assert all(isinstance(r, EngineDeadError) and "KeyError" in str(r) for r in results), results
        error = await asyncio.wait_for(engine.wait_dead(), timeout=1)
        assert "crashed" in str(error)
        with pytest.raises(EngineDeadError):
            engine.check_health()
        engine.shutdown()

    asyncio.run(main())


def test_a_cancelled_caller_aborts_its_request_and_the_engine_serves_on(tiny_tokenizer):
    """A client that disconnects: the task awaiting the stream is cancelled; the core frees the row and counts an
    abort; other requests are unaffected."""
    tok = tiny_tokenizer

    async def main():
        engine, _ = make(tok, {1: [5] * 500}, max_num_seqs=2)
        await engine.start(warmup=False)
        doomed = asyncio.ensure_future(collect(engine, "gone", (1,), SamplingParams(max_tokens=500, temperature=0)))
        other = asyncio.ensure_future(collect(engine, "stays", (2,), SamplingParams(max_tokens=20, temperature=0,
                                                                                    ignore_eos=True)))
        await asyncio.sleep(0.02)
        doomed.cancel()
        _, last = await asyncio.wait_for(other, timeout=5)
        assert last.num_output_tokens == 20
        for _ in range(100):  # the abort reaches the core at its next step
            if engine.status().num_finished.get("abort"):
                break
            await asyncio.sleep(0.01)
        status = engine.status()
        assert status.num_finished == {"abort": 1, "length": 1} and status.num_running == 0
        assert status.kv_cache_usage == 0
        engine.shutdown()

    asyncio.run(main())


def test_the_serving_loop_never_waits_on_a_step(tiny_tokenizer):
    """A step that holds the core's thread for 100 ms (as a CPU-heavy step would) leaves the caller's event loop
    free: its timers fire on time while tokens keep coming."""
    import time

    tok = tiny_tokenizer

    async def main():
        ex = ScriptedExecutor(scripts={1: [5] * 10})
        real_step = ex.step

        async def blocking_step(step):
            time.sleep(0.1)  # the core's thread is busy; the GIL is released, as in a torch kernel
            return await real_step(step)

        ex.step = blocking_step
        engine = Engine(ex, tok, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64))
        await engine.start(warmup=False)
        run = asyncio.ensure_future(collect(engine, "a", (1,), SamplingParams(max_tokens=5, temperature=0,
                                                                             ignore_eos=True)))
        lags = []
        while not run.done():
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - start - 0.005)
        await run
        engine.shutdown()
        return lags

    lags = asyncio.run(main())
    assert len(lags) > 40 and max(lags) < 0.05, f"the loop waited {max(lags):.3f}s"
