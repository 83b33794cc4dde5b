"""A TP=2 gang whose KV cache is too small for its load: concurrent requests sharing a prefix are prefilled in
chunks, preempted and recomputed, and hit the prefix cache, yet each greedy output equals the same request run
alone. (Its own module: the continuous-batching module's gang holds both CPUs of the test Ray instance.)"""

import asyncio
import random

from raytp.messages import SamplingParams
from tests.integration.test_continuous_batching import run


def test_tp2_preemption_chunks_and_prefix_hits_equal_solo_runs(ray_session, tiny_tokenizer):
    """A TP=2 gang with a KV cache of 11 blocks of 16 tokens and 16-token steps: concurrent requests sharing a
    prefix are chunked, preempted and recomputed, and hit the prefix cache, yet each greedy output equals the
    same request run alone."""
    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.gang.executor import RayExecutor

    block_bytes = 2 * 2 * 16 * 1 * 32 * 4  # per rank: layers x (k, v) x block x 1 of 2 kv heads x head dim x fp32
    cfg = resolve({"model": "raytp-tiny-llama", "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32",
                   "kv_cache_memory_bytes": 12 * block_bytes, "max_num_batched_tokens": 16, "max_num_seqs": 4})
    rng = random.Random(7)
    shared = [rng.randrange(10, 400) for _ in range(40)]
    requests = []
    for i in range(8):
        prompt = shared[:rng.choice([0, 20, 40])] + [rng.randrange(10, 400) for _ in range(rng.randint(1, 20))]
        params = SamplingParams(max_tokens=rng.randint(8, 24), temperature=0.0, ignore_eos=True)
        requests.append((f"t{i}", prompt, params, rng.uniform(0, 0.2)))

    async def main():
        engine = make_engine(cfg, RayExecutor(cfg), tiny_tokenizer)
        await engine.start()
        try:
            solo = [await run(engine, rid + "-solo", p, sp) for rid, p, sp, _ in requests]
            together = await asyncio.gather(*(run(engine, rid, p, sp, d) for rid, p, sp, d in requests))
            return solo, list(together), engine.status()
        finally:
            engine.shutdown()

    solo, together, status = asyncio.run(main())
    assert together == solo
    assert status.num_preemptions > 0 and status.prefix_cache_hit_rate > 0
