"""A gang on the driver's node takes its steps through the step channel (``raytp.gang.channel``), with the same
tokens as through Ray actor calls (``RAYTP_STEP_CHANNEL=0``), and a rank's exception in a step still fails the gang
with the rank's own error. (A rank killed mid-stream: ``test_gang_app.py``, ``test_replicas.py``; a stopped or hung
rank: ``test_liveness.py``, all through the channel.)"""

import asyncio

import pytest

from raytp.errors import EngineDeadError
from raytp.messages import NewRequest, RowInput, SamplingParams, StepInput

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
CONFIG = {"model": "raytp-tiny-llama", "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32"}


def run(steps: int) -> tuple[list[int], int | None]:
    """Greedy tokens of one row over ``steps`` steps on a fresh TP=2 gang, and the steps its channel carried."""
    from raytp.config import resolve
    from raytp.gang.executor import RayExecutor

    ex = RayExecutor(resolve(CONFIG))

    async def main():
        await ex.start()
        try:
            prompt = (5, 6, 7)
            out = await ex.step(StepInput((NewRequest("a", 0, GREEDY, len(prompt), (1, 2)),),
                                          (RowInput(0, prompt, 0, True),)))
            tokens = list(out.tokens)
            for i in range(steps - 1):
                out = await ex.step(StepInput((), (RowInput(0, (tokens[-1],), len(prompt) + i, True),)))
                tokens += out.tokens
            return tokens, ex._channel.steps if ex._channel is not None else None
        finally:
            ex.shutdown()

    return asyncio.run(main())


def test_steps_through_the_channel_give_the_tokens_of_actor_calls(ray_session, monkeypatch):
    through_channel, carried = run(5)
    assert carried == 5
    monkeypatch.setenv("RAYTP_STEP_CHANNEL", "0")
    through_ray, carried = run(5)
    assert carried is None
    assert len(through_channel) == 5 and through_channel == through_ray


def test_a_ranks_exception_in_a_step_fails_the_gang_with_its_error(ray_session):
    from raytp.config import resolve
    from raytp.gang.executor import RayExecutor

    ex = RayExecutor(resolve(CONFIG))

    async def main():
        await ex.start()
        try:
            assert ex._channel is not None
            with pytest.raises(EngineDeadError, match=r"'step' failed: KeyError"):
                await ex.step(StepInput((), (RowInput(42, (5,), 3, True),)))  # a row no rank was told of
            with pytest.raises(EngineDeadError, match="TP gang is dead"):
                await ex.step(StepInput())
        finally:
            ex.shutdown()

    asyncio.run(main())
