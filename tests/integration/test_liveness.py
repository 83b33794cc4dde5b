"""Slow is not dead: a step that takes longer than ``step_timeout_s`` completes while every rank answers the
executor's liveness pings; a rank that stops answering (SIGSTOP) is still caught within the configured time."""

import asyncio
import os
import signal
import time

import pytest

from raytp.errors import EngineDeadError
from raytp.messages import SamplingParams, SeqInput, StepInput

STEP_S, TIMEOUT_S = 4.0, 1.0


def test_a_slow_step_completes_and_a_stopped_rank_is_caught(ray_session):
    from raytp.config import resolve
    from raytp.gang.executor import RayExecutor
    from raytp.testing import slow_worker_cls

    cfg = resolve({"model": "raytp-tiny-llama", "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32",
                   "step_timeout_s": TIMEOUT_S})
    ex = RayExecutor(cfg, worker_cls=slow_worker_cls(STEP_S))
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def main():
        await ex.start()
        try:
            started = time.monotonic()
            out = await ex.step(StepInput(new=(SeqInput("a", (5, 6, 7), greedy),)))
            took = time.monotonic() - started
            assert len(out.tokens) == 1 and took >= STEP_S, took  # 4 s > the 1 s timeout: slow, not dead
            out = await ex.step(StepInput(decode=True))
            assert len(out.tokens) == 1
            pids = await ex.pids()
            os.kill(pids[1], signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(EngineDeadError, match="liveness ping"):
                await ex.step(StepInput(decode=True))
            caught_in = time.monotonic() - started
            print(f"{STEP_S:.0f} s step completed with step_timeout_s={TIMEOUT_S:.0f}; stopped rank caught after "
                  f"{caught_in:.1f}s")
            # one ping period (min(2 s, timeout)) + the timeout, and well before the 4 s step itself would end
            assert caught_in < STEP_S
        finally:
            ex.shutdown()

    asyncio.run(main())
