"""Iteration-level batching on a real TP=2 gang (float32), with async scheduling (rank 0 shares the tokens it
sampled for the next step's rows): batched outputs equal solo outputs, short requests overtake long ones,
cancelled rows are freed on every rank."""

import asyncio
import random

import pytest

from raytp.messages import SamplingParams

STOPS = ["e", "th", "s ", "ar", "0"]


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(ray_session, loop, tiny_tokenizer):
    from raytp.config import resolve
    from raytp.engine.engine import Engine
    from raytp.engine.scheduler import SchedulerConfig
    from raytp.gang.executor import RayExecutor

    cfg = resolve({"model": "raytp-tiny-llama", "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32"})
    engine = Engine(RayExecutor(cfg), tiny_tokenizer, SchedulerConfig("continuous", 4, 64, max_num_batched_tokens=48,
                                                                         async_scheduling=True))
    loop.run_until_complete(engine.start())
    yield engine
    engine.shutdown()
    loop.run_until_complete(asyncio.sleep(0.2))  # let the cancelled engine loop finish before the loop closes


async def run(engine, rid, prompt, params, delay=0.0, stop_after=None):
    await asyncio.sleep(delay)
    text, last, n = [], None, 0
    gen = engine.generate(rid, tuple(prompt), params)
    async for out in gen:
        text.append(out.text)
        last = out
        n += 1
        if stop_after is not None and n >= stop_after:
            await gen.aclose()
            return "".join(text), None
    return "".join(text), (last.finish_reason, last.num_output_tokens)


@pytest.mark.parametrize("schedule_seed", [0, 1])
def test_random_concurrent_schedules_equal_solo_runs(engine, loop, schedule_seed):
    rng = random.Random(schedule_seed)
    requests = []
    for i in range(10):
        prompt = [rng.randrange(10, 400) for _ in range(rng.randint(1, 60))]
        params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0.0, ignore_eos=rng.random() < 0.5,
                                stop=tuple(rng.sample(STOPS, rng.randint(0, 2))))
        requests.append((f"s{schedule_seed}-{i}", prompt, params, rng.uniform(0, 0.3)))
    solo = [loop.run_until_complete(run(engine, rid + "-solo", p, sp)) for rid, p, sp, _ in requests]

    async def concurrently():
        return await asyncio.gather(*(run(engine, rid, p, sp, d) for rid, p, sp, d in requests))

    together = loop.run_until_complete(concurrently())
    assert together == solo
    assert (engine.status().num_running, engine.status().num_waiting) == (0, 0)


def test_short_request_overtakes_long_one(engine, loop):
    async def main():
        order = []

        async def tracked(name, *args, **kw):
            result = await run(engine, name, *args, **kw)
            order.append(name)
            return result

        # as long as the model allows: steps of the tiny model take ~2 ms, and 200 tokens were once done before the
        # short request had run its few steps
        long = asyncio.ensure_future(tracked("long", [11, 12, 13], SamplingParams(max_tokens=1000, temperature=0.0,
                                                                                      ignore_eos=True)))
        await asyncio.sleep(0.3)  # the long request is decoding
        assert not long.done()
        await tracked("short", [14, 15], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        await long
        return order

    assert loop.run_until_complete(main()) == ["short", "long"]


def test_cancel_frees_the_slot_for_others(engine, loop):
    long = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    b_solo = loop.run_until_complete(run(engine, "b-solo", [21, 22, 23], long))

    async def main():
        # 4 slots: a (cancelled), b, c1, c2 fill them; d only fits once a's row is freed
        a = asyncio.ensure_future(run(engine, "a", [30, 31], long, stop_after=3))
        b = asyncio.ensure_future(run(engine, "b", [21, 22, 23], long))
        c = [asyncio.ensure_future(run(engine, f"c{i}", [40 + i], long)) for i in range(2)]
        assert (await a)[1] is None
        d = await run(engine, "d", [50, 51], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert not b.done(), "d got a's slot while b was still decoding"
        return d, await b, await asyncio.gather(*c)

    d, b, _ = loop.run_until_complete(main())
    assert d[1] == ("length", 3)
    assert b == b_solo, "cancelling a neighbour does not change another request's output"
    assert engine.status().num_running == 0

