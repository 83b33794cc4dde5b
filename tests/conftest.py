"""Shared fixtures. Tests are split by what they need: unit/ (no Ray; the tiny model at most),
serve/ (local Ray + Serve, the real ingress/server/engine over a scripted gang), integration/ (real TP=2
gangs: gloo + DeepSpeed shm, tiny random Llama), ipex/ (ipex-llm environment), device/ (real XPU / CUDA;
skipped where absent)."""

import asyncio
import contextlib
import os

import pytest

# A test run must never reach a hub, and float32 keeps TP=2 == TP=1 exact.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


# Triton compiles for GPUs only; where there is none, its interpreter runs the kernels on CPU tensors (set before
# any kernel is defined: triton.jit reads it then). On a GPU machine the kernels compile for real.
if not _has_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_path():
    from raytp import tiny_model

    return tiny_model.ensure("raytp-tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance with this machine's 2 CPUs for the integration tests."""
    import ray

    if not ray.is_initialized():
        # metrics exported every second (default: every few seconds) so metric tests need not wait long
        # address="local": a fresh instance, never a cluster another test or user left running on the machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


def run_gang(config: dict, batches: list[list[list[int]]], max_tokens: int, logprobs: bool = False,
             reports: list | None = None) -> list[list[list]]:
    """On one fresh gang (through the engine, so through the paged KV cache), greedy-generate ``max_tokens``
    tokens for each batch of prompts in turn (a batch's prompts concurrently, the next batch once it is done);
    return the tokens per prompt, per batch (with ``logprobs``: (token, its log-probability) pairs). ``reports``:
    extended with the ranks' ``LoadReport``s."""
    from transformers import AutoTokenizer

    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.gang.executor import RayExecutor
    from raytp.messages import SamplingParams

    cfg = resolve(config)
    executor = RayExecutor(cfg)
    engine = make_engine(cfg, executor, AutoTokenizer.from_pretrained(cfg.model_path))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0 if logprobs else None)

    async def one(rid: str, prompt: list[int]) -> list:
        if logprobs:
            return [(t, lp[0]) async for out in engine.generate(rid, tuple(prompt), params)
                    for t, lp in zip(out.token_ids, out.logprobs)]
        return [t async for out in engine.generate(rid, tuple(prompt), params) for t in out.token_ids]

    async def main():
        await engine.start()
        if reports is not None:
            reports.extend(engine.load_reports)
        try:
            assert executor.shm_segments() == [], "each rank unlinks its shm buffer once every rank has mapped it"
            results = []
            for b, prompts in enumerate(batches):
                results.append(list(await asyncio.gather(*(one(f"{b}-{i}", p) for i, p in enumerate(prompts)))))
            return results
        finally:
            engine.shutdown()

    return asyncio.run(main())


# RAYTP_TEST_PORT: Serve's HTTP port for the tests (several test runs on one machine each need their own)
PORT = int(os.environ.get("RAYTP_TEST_PORT", "8000"))
URL = f"http://127.0.0.1:{PORT}"


@contextlib.contextmanager
def serve_app(args: dict, engine_factory=None, **server_options):
    """Run raytp as Serve app 'raytp' on 127.0.0.1:PORT for the block; yields the app's handle.

    ``args`` is a RaytpConfig dict; ``engine_factory`` replaces the engine (``raytp.testing``);
    ``server_options`` are LLMServer deployment options (num_replicas, ...). Serve itself (controller, proxy)
    stays up for the next module; the app is deleted, which waits until its replicas and their gangs are gone."""
    from ray import serve

    from raytp.serve.app import bind_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        serve.run(bind_app(args, engine_factory=engine_factory, server_options=server_options), name="raytp",
                  route_prefix="/")
        yield serve.get_app_handle("raytp")
    finally:
        serve.delete("raytp")


class StreamingLoad:
    """``clients`` threads streaming completions from ``url`` in a loop for the duration of the ``with`` block;
    ``failures`` lists every request that did not end as a whole stream (200, ``max_tokens`` token events, no
    error event, ``[DONE]``) as (status, what went wrong); ``done`` counts all requests."""

    def __init__(self, url: str, model: str, clients: int = 8, max_tokens: int = 12):
        import threading

        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    @property
    def done(self) -> int:
        return len(self.results)

    @property
    def failures(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r != (200, "ok")]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(180)

    def _client(self, i: int) -> None:
        while not self._stop.is_set():
            self.results.append(self._stream(i))

    def _stream(self, i: int) -> tuple[int, str]:
        import requests

        body = {"model": self.model, "prompt": f"client {i}", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True}
        try:
            with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=120) as r:
                if r.status_code != 200:
                    return r.status_code, r.text[:200]
                events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        except requests.RequestException as e:
            return 0, repr(e)
        errors = [e for e in events if '"error"' in e]
        if errors or events[-1:] != ["[DONE]"] or len(events) != self.max_tokens + 1:
            return 200, f"{len(events)} events, last {events[-1:]}, errors {errors[:1]}"
        return 200, "ok"
