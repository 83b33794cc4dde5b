"""One CUDA device, in process, no Ray (runs on a machine with torch and CUDA only): steps replayed from CUDA
graphs (counted: graphs captured but never replayed fail) give exactly the tokens of eager steps — decode steps
through the sdpa backend, whole steps (mixed ones too) through the triton backend —, the triton backend gives the
sdpa backend's tokens, and torchao int4 runs on CUDA's kernel. Skipped without CUDA."""

import asyncio
import random

import pytest
import torch

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def generate_all(overrides: dict, requests) -> tuple[list[list[int]], object]:
    from transformers import AutoTokenizer

    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.gang.local import LocalExecutor
    from raytp.messages import SamplingParams

    cfg = resolve({"model": "raytp-tiny-llama", "tensor_parallel_size": 1, "device": "cuda", "max_num_seqs": 8,
                   "max_model_len": 256, **overrides})
    engine = make_engine(cfg, LocalExecutor(cfg), AutoTokenizer.from_pretrained(cfg.model_path))

    async def one(rid, prompt, n, delay):
        await asyncio.sleep(delay)
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return [t async for out in engine.generate(rid, tuple(prompt), params) for t in out.token_ids]

    async def main():
        await engine.start()
        try:
            out = list(await asyncio.gather(*(one(f"r{i}", *r) for i, r in enumerate(requests))))
            runner = engine.executor.runner
            layer = runner.model.model.layers[0]
            replays = runner.graphs.replays if runner.graphs is not None else 0
            return out, (engine.load_reports[0], type(layer.mlp.up_proj.weight).__name__, replays)
        finally:
            engine.shutdown()

    return asyncio.run(main())


def workload(seed: int, n: int = 7):
    rng = random.Random(seed)
    return [([rng.randrange(10, 400) for _ in range(rng.randint(1, 40))], rng.randint(4, 60), rng.uniform(0, 0.05))
            for _ in range(n)]


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_cuda_graph_steps_equal_eager_float32(backend, monkeypatch):
    from raytp.gang.attention.shapes import StepShapes

    loaded = []  # per step run on fixed shapes: (rows, tokens)
    for policy in StepShapes.__subclasses__():
        real = policy.load
        monkeypatch.setattr(policy, "load", lambda self, rows, bucket, tables, real=real: loaded.append(
            (len(rows), sum(len(r.token_ids) for r in rows))) or real(self, rows, bucket, tables))
    work = workload(0)
    chunked = {"dtype": "float32", "attention_backend": backend, "max_num_batched_tokens": 32}  # prompts chunk
    eager, (eager_report, _, eager_replays) = generate_all({**chunked, "enforce_eager": True}, work)
    graphs, (report, _, replays) = generate_all(chunked, work)
    assert eager_report.decode_mode == "eager" and eager_replays == 0
    assert report.decode_mode == "cuda_graphs" and report.attention_backend == backend
    assert report.decode_warm_up_s > 0
    assert replays == len(loaded) > 0, "steps ran as graph replays"
    assert graphs == eager
    assert [len(t) for t in graphs] == [n for _, n, _ in work]
    if backend == "triton":  # whole steps replayed, mixed ones included
        assert any(tokens > rows for rows, tokens in loaded) and any(tokens == rows for rows, tokens in loaded)


def test_triton_backend_equals_sdpa_backend_float32():
    work = workload(2)
    sdpa, _ = generate_all({"dtype": "float32", "attention_backend": "sdpa", "enforce_eager": True}, work)
    triton, (report, _) = generate_all({"dtype": "float32", "attention_backend": "triton", "enforce_eager": True},
                                       work)
    assert report.attention_backend == "triton" and triton == sdpa


def test_torchao_int4_on_cuda_with_graphs_equals_eager_int4():
    work = workload(1)
    eager, _ = generate_all({"quantization": "int4", "enforce_eager": True}, work)
    graphs, (report, weight_type, replays) = generate_all({"quantization": "int4"}, work)
    assert report.decode_mode == "cuda_graphs" and weight_type.startswith("Int4") and replays > 0
    assert graphs == eager
