"""Slow is not dead: a step longer than ``step_timeout_s`` completes while every rank keeps answering the
executor's liveness pings with a growing count of decoder layers run; a rank that stops answering (SIGSTOP), or
answers without making progress (hung), still fails the gang within about ``step_timeout_s``."""

import asyncio
import os
import signal
import time

import pytest

from raytp.errors import EngineDeadError
from raytp.messages import NewRequest, RowInput, SamplingParams, StepInput

LAYER_S, TIMEOUT_S = 2.0, 3.0  # the tiny model has 2 decoder layers: a 4 s step, each layer within the timeout
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
CONFIG = {"model": "raytp-tiny-llama", "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32",
          "step_timeout_s": TIMEOUT_S}


def step(token_ids: tuple[int, ...], start_pos: int = 0) -> StepInput:
    """Row "a" computing ``token_ids`` at ``start_pos`` in KV block 1, sampling one token (joining the ranks'
    batch at position 0)."""
    new = (NewRequest("a", 0, GREEDY, len(token_ids), (1,)),) if start_pos == 0 else ()
    return StepInput(new, (RowInput(0, token_ids, start_pos, True),))


def executor(layer_delay_s: float):
    from raytp.config import resolve
    from raytp.gang.executor import RayExecutor
    from raytp.testing import slow_worker_cls

    return RayExecutor(resolve(CONFIG), worker_cls=slow_worker_cls(layer_delay_s))


def test_a_slow_step_completes_and_a_stopped_rank_is_caught(ray_session):
    ex = executor(LAYER_S)

    async def main():
        await ex.start()
        try:
            started = time.monotonic()
            out = await ex.step(step((5, 6, 7)))
            took = time.monotonic() - started
            assert len(out.tokens) == 1 and took >= 2 * LAYER_S > TIMEOUT_S, took  # slow, not dead
            pids = await ex.pids()
            os.kill(pids[1], signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(EngineDeadError, match="liveness ping"):
                await ex.step(step(out.tokens, 3))
            caught_in = time.monotonic() - started
            print(f"{took:.1f}s step completed with step_timeout_s={TIMEOUT_S:.0f}; a stopped rank was caught after "
                  f"{caught_in:.1f}s")
            assert caught_in < 2 + TIMEOUT_S + 2  # one ping period + the ping's timeout (+ slack)
        finally:
            ex.shutdown()

    asyncio.run(main())


def test_a_rank_that_answers_but_makes_no_progress_is_caught(ray_session):
    ex = executor(3 * TIMEOUT_S)  # one layer outlasts the timeout: alive, but stuck

    async def main():
        await ex.start()
        try:
            started = time.monotonic()
            with pytest.raises(EngineDeadError, match="made no progress"):
                await ex.step(step((5, 6, 7)))
            caught_in = time.monotonic() - started
            print(f"a rank stuck in one layer was caught after {caught_in:.1f}s")
            assert TIMEOUT_S < caught_in < 3 * TIMEOUT_S
        finally:
            ex.shutdown()

    asyncio.run(main())
