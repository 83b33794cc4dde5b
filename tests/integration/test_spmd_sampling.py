"""Every rank samples (TP=2, DeepSpeed AutoTP over gloo + DeepSpeed's shm all-reduce, bf16, async scheduling): the
all-reduced logits every rank samples from are bit-identical, so every rank draws the same tokens (greedy and seeded),
and a step whose rows wait on last step's tokens (``PENDING_TOKEN``) runs no collective and no host sync before its
forward."""

import asyncio

from raytp.messages import SamplingParams


def recording_worker_cls():
    """A ``Worker`` that records, per step: a digest of the logits it samples from, the tokens it sampled, which
    collectives and host syncs (``tolist`` / ``item`` / ``cpu``) ran between the step's start and its forward, and
    how many steps carried pending rows."""
    import ray

    from raytp.gang.worker import Worker

    class RecordingWorker(Worker):
        def load_model(self, model=None):
            import hashlib

            import torch
            import torch.distributed as dist

            from raytp.messages import PENDING_TOKEN

            report = super().load_model(model)
            runner, log = self.runner, {"digests": [], "tokens": [], "before_forward": [], "pending_steps": 0}
            watch = {"armed": False, "calls": []}
            self.log = log

            def counted(name, fn):
                def call(*args, **kwargs):
                    if watch["armed"]:
                        watch["calls"].append(name)
                    return fn(*args, **kwargs)
                return call

            for name in ("broadcast", "all_reduce", "all_gather", "all_gather_object", "broadcast_object_list",
                         "barrier", "send", "recv"):
                setattr(dist, name, counted(name, getattr(dist, name)))
            for name in ("tolist", "item", "cpu"):
                setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
            real_step, real_forward, real_sample = runner.step, runner._forward, runner._sample

            def step(s):
                log["pending_steps"] += any(r.token_ids[:1] == (PENDING_TOKEN,) for r in s.rows)
                watch["armed"], watch["calls"] = True, []
                try:
                    return real_step(s)
                finally:
                    watch["armed"] = False

            def forward(*args, **kwargs):
                if watch["armed"]:
                    log["before_forward"].append(list(watch["calls"]))
                    watch["armed"] = False
                return real_forward(*args, **kwargs)

            def sample(logits, rows):
                log["digests"].append(hashlib.sha256(logits.float().contiguous().numpy().tobytes()).hexdigest())
                out = real_sample(logits, rows)
                log["tokens"].append([runner.requests.last_sampled[r.slot] for r in rows])
                return out

            runner.step, runner._forward, runner._sample = step, forward, sample
            return report

        # not the default group: its one thread runs the rank's end of the step channel (``serve_steps``) for good
        @ray.method(concurrency_group="liveness")
        def records(self) -> dict:
            return self.log

    return RecordingWorker


def test_ranks_sample_identical_logits_and_nothing_waits_before_a_forward(ray_session, tiny_tokenizer):
    import ray

    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.gang.executor import RayExecutor

    cfg = resolve({"model": "raytp-tiny-llama", "tensor_parallel_size": 2, "device": "cpu", "dtype": "bfloat16",
                   "async_scheduling": True})
    executor = RayExecutor(cfg, worker_cls=recording_worker_cls())
    engine = make_engine(cfg, executor, tiny_tokenizer)
    requests = [((5, 6, 7), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
                (tuple(range(30, 50)), SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)),
                (tuple(range(60, 64)), SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, seed=1,
                                                       ignore_eos=True))]

    async def main():
        await engine.start(warmup=False)
        try:
            async def one(i, prompt, params):
                return [t async for out in engine.generate(f"r{i}", prompt, params) for t in out.token_ids]

            outputs = await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))
            return outputs, ray.get([w.records.remote() for w in executor.workers], timeout=60)
        finally:
            engine.shutdown()

    outputs, (rank0, rank1) = asyncio.run(main())
    assert [len(o) for o in outputs] == [12, 12, 9]
    assert rank0["digests"] and rank0["digests"] == rank1["digests"], "the all-reduced logits differ between ranks"
    assert rank0["tokens"] == rank1["tokens"]
    assert rank0["pending_steps"] > 3, "async scheduling sent steps whose inputs were still in flight"
    for rank in (rank0, rank1):
        assert len(rank["before_forward"]) >= rank["pending_steps"]
        assert all(calls == [] for calls in rank["before_forward"]), rank["before_forward"]
