"""The step channel's two ends (rank ends on threads, as on a rank, and one in a process that is killed): steps in
flight are answered in order, a rank's exception reaches the driver as ``RankFailed`` with its cause, a killed rank
fails what waits on it and every later step at once, and the socket's file is gone once the ranks are connected."""

import asyncio
import multiprocessing
import os
import signal
import threading
import time

import pytest

from raytp.gang.channel import RankFailed, RankGone, StepChannel, serve_rank


def rank_thread(path: str, rank: int, step) -> threading.Thread:
    thread = threading.Thread(target=serve_rank, args=(path, rank, step), daemon=True)
    thread.start()
    return thread


def start(world_size: int, step):
    channel = StepChannel(world_size)
    path = channel.listen()
    threads = [rank_thread(path, rank, lambda s, rank=rank: step(rank, s)) for rank in range(world_size)]
    return channel, threads


def test_steps_in_flight_are_answered_in_order_by_every_rank():
    release = threading.Event()

    def step(rank, s):
        if s == "first":
            release.wait(5)  # the first step is still running when the second is sent
        return (rank, s)

    async def main():
        channel, _ = start(2, step)
        await asyncio.wait_for(channel.accept(), 5)
        assert not os.path.exists(os.path.dirname(channel.path))  # connected: the socket file is gone already
        try:
            first = asyncio.gather(*await channel.send("first"))
            second = asyncio.gather(*await channel.send("second"))
            await asyncio.sleep(0.05)
            assert not first.done() and not second.done()
            release.set()
            assert await asyncio.wait_for(first, 5) == [(0, "first"), (1, "first")]
            assert await asyncio.wait_for(second, 5) == [(0, "second"), (1, "second")]
            assert channel.steps == 2
        finally:
            channel.close()

    asyncio.run(main())


def test_a_ranks_exception_reaches_the_driver_with_its_cause():
    def step(rank, s):
        if rank == 1:
            raise ValueError(f"bad row in {s}")
        return s

    async def main():
        channel, _ = start(2, step)
        await asyncio.wait_for(channel.accept(), 5)
        try:
            futures = await channel.send("step 7")
            assert await asyncio.wait_for(futures[0], 5) == "step 7"
            with pytest.raises(RankFailed) as failed:
                await asyncio.wait_for(futures[1], 5)
            assert isinstance(failed.value.cause, ValueError) and str(failed.value.cause) == "bad row in step 7"
        finally:
            channel.close()

    asyncio.run(main())


def _rank_process(path: str, rank: int) -> None:
    serve_rank(path, rank, lambda s: s)


def test_a_killed_rank_fails_the_waiting_step_and_every_later_one():
    ctx = multiprocessing.get_context("spawn")

    async def main():
        channel = StepChannel(2)
        path = channel.listen()
        rank_thread(path, 0, lambda s: s)
        process = ctx.Process(target=_rank_process, args=(path, 1))
        process.start()
        await asyncio.wait_for(channel.accept(), 30)
        try:
            assert await asyncio.wait_for(asyncio.gather(*await channel.send("step")), 5) == ["step", "step"]
            os.kill(process.pid, signal.SIGKILL)
            process.join(5)
            started = time.monotonic()
            with pytest.raises(RankGone, match="rank 1 closed its step channel"):
                await asyncio.wait_for(asyncio.gather(*await channel.send("next")), 5)
            later = await channel.send("later")
            with pytest.raises(RankGone):
                await asyncio.wait_for(later[0], 1)
            assert time.monotonic() - started < 2
        finally:
            channel.close()
            process.kill()

    asyncio.run(main())

