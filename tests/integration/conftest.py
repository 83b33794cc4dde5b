import asyncio

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance with this machine's 2 CPUs for the integration tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def run_gang(config: dict, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy-generate ``max_tokens`` tokens for a batch of ``prompts`` on a fresh gang; return tokens per prompt."""
    from raytp.config import resolve
    from raytp.engine.types import SamplingParams, SeqInput
    from raytp.executor import RayExecutor

    async def main():
        ex = RayExecutor(resolve(config))
        await ex.start()
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            steps = [await ex.execute("prefill", [SeqInput(str(i), tuple(p), params) for i, p in enumerate(prompts)])]
            for _ in range(max_tokens - 1):
                steps.append(await ex.execute("decode"))
            return [list(col) for col in zip(*steps)]
        finally:
            ex.shutdown()

    return asyncio.run(main())
