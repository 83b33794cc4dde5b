"""How one request is sent and timed. ``HTTPClient`` streams from an OpenAI-compatible server;
``TransformersClient`` runs transformers ``generate`` in this process, one request at a time (the baseline).
Both return a ``RequestResult`` with the token arrival times the metrics need."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from raytp.bench.workload import BenchRequest


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int = 0
    output_len: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    error: str = ""

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (vLLM's TPOT); 0 for one-token outputs."""
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1) if self.output_len > 1 else 0.0


class HTTPClient:
    """Streams ``/v1/completions`` with ``stream_options.include_usage`` (token counts from the server's usage)."""

    def __init__(self, base_url: str, model: str, ignore_eos: bool, api_key: str | None = None,
                 endpoint: str = "/v1/completions", timeout_s: float = 600.0, tokenizer=None):
        self.url = base_url.rstrip("/") + endpoint
        self.model, self.ignore_eos = model, ignore_eos
        # a server that takes only text prompts and sends no usage (``transformers serve``): token-id prompts are
        # decoded with ``tokenizer``, and the output tokens are the streamed chunks that carry text
        self.tokenizer = tokenizer
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self._http = None

    async def __aenter__(self):
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._http = httpx.AsyncClient(timeout=self.timeout_s, limits=limits, headers=self.headers)
        return self

    async def __aexit__(self, *exc):
        await self._http.aclose()

    async def send(self, req: BenchRequest) -> RequestResult:
        prompt = req.prompt
        if self.tokenizer is not None and not isinstance(prompt, str):
            prompt = self.tokenizer.decode(prompt)
        body = {"model": self.model, "prompt": prompt, "max_tokens": req.output_len, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos and self.tokenizer is None:  # (transformers serve refuses the field: 422)
            body["ignore_eos"] = True
        start = time.perf_counter()
        last, ttft, itl, usage, chunks = start, 0.0, [], None, 0
        try:
            async with self._http.stream("POST", self.url, json=body) as r:
                if r.status_code != 200:
                    return RequestResult(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        return RequestResult(False, error=str(data["error"].get("message", data["error"]))[:200])
                    if data.get("usage"):
                        usage = data["usage"]
                    if not data.get("choices") or not (data["choices"][0].get("text") or
                                                        data["choices"][0].get("finish_reason")):
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        ttft = now - start
                    else:
                        itl.append(now - last)
                    last, chunks = now, chunks + 1
        except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash of the benchmark
            return RequestResult(False, error=f"{type(e).__name__}: {e}"[:200])
        end = time.perf_counter()
        if usage is None and self.tokenizer is not None:
            usage = {"prompt_tokens": req.prompt_len or 0, "completion_tokens": chunks}
        if usage is None:
            return RequestResult(False, error="server sent no usage (stream_options.include_usage unsupported?)")
        return RequestResult(True, usage["prompt_tokens"], usage["completion_tokens"], ttft, end - start, itl)


class TransformersClient:
    """In-process ``transformers`` generate, greedy, one request at a time (a lock): the no-serving baseline.
    Token times come from a streamer called once per generated token."""

    def __init__(self, model_path: str, dtype: str, ignore_eos: bool, threads: int | None = None):
        import os

        import torch
        from transformers import AutoModelForCausalLM

        from raytp.compat import dtype_kwarg

        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **dtype_kwarg(getattr(torch, dtype))).eval()
        self.ignore_eos = ignore_eos
        self._lock = asyncio.Lock()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    def _generate(self, req: BenchRequest) -> RequestResult:
        import torch

        if not isinstance(req.prompt, list):
            raise ValueError("the transformers baseline takes token-id prompts (--dataset-name random)")
        times: list[float] = []

        class _Clock:  # transformers' streamer protocol: put() per step (the prompt first), end()
            def put(self, _value):
                times.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor([req.prompt])
        kwargs = {"min_new_tokens": req.output_len} if self.ignore_eos else {}
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.output_len,
                                      do_sample=False, streamer=_Clock(), **kwargs)
        end = time.perf_counter()
        token_times = times[1:]  # times[0] is the prompt being "streamed"
        n = out.shape[1] - ids.shape[1]
        itl = [b - a for a, b in zip(token_times, token_times[1:])]
        return RequestResult(True, ids.shape[1], n, token_times[0] - start, end - start, itl)

    async def send(self, req: BenchRequest) -> RequestResult:
        sent = time.perf_counter()
        async with self._lock:  # one at a time; the others queue, and their wait counts in TTFT and E2E
            waited = time.perf_counter() - sent
            result = await asyncio.to_thread(self._generate, req)
        result.ttft_s += waited
        result.e2e_s += waited
        return result


class EngineClient:
    """raytp's engine in this process (``LocalExecutor``: TP=1, no Ray, no Serve), on the same requests: what the
    Serve path is measured against. ``config``: raytp config fields (a dict, as in serve_config.yaml's args)."""

    def __init__(self, config: dict, ignore_eos: bool):
        self.config = config
        self.ignore_eos = ignore_eos
        self.engine = None
        self._next = 0

    async def __aenter__(self):
        from transformers import AutoTokenizer

        from raytp.config import resolve
        from raytp.engine.engine import make_engine
        from raytp.gang.local import LocalExecutor

        cfg = resolve({**self.config, "tensor_parallel_size": 1})
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
        self.engine = make_engine(cfg, LocalExecutor(cfg), tokenizer)
        await self.engine.start()
        return self

    async def __aexit__(self, *exc):
        self.engine.shutdown()

    async def send(self, req: BenchRequest) -> RequestResult:
        from raytp.messages import SamplingParams

        prompt = req.prompt if isinstance(req.prompt, list) else self.engine.tokenizer.encode(req.prompt)
        params = SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=self.ignore_eos)
        self._next += 1
        start = last = time.perf_counter()
        ttft, itl, n = 0.0, [], 0
        try:
            async for out in self.engine.generate(f"bench-{self._next}", tuple(prompt), params):
                now = time.perf_counter()
                if n == 0:
                    ttft = now - start
                else:
                    itl.append(now - last)
                last, n = now, n + len(out.token_ids)
        except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash of the benchmark
            return RequestResult(False, error=f"{type(e).__name__}: {e}"[:200])
        return RequestResult(True, len(prompt), n, ttft, time.perf_counter() - start, itl)
