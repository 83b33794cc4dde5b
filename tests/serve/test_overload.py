"""200 concurrent streaming clients against 8 batch slots and a bounded queue: each gets a full answer or
429 + Retry-After, the counts add up, and the serving processes' memory stays bounded."""

import asyncio
import json

import psutil
import pytest

from raytp.testing import scripted_engine_factory
from tests.conftest import URL, serve_app
from tests.serve.conftest import MODEL

CLIENTS, MAX_TOKENS = 200, 12


@pytest.fixture(scope="module")
def app(ray_session):
    with serve_app({"model": MODEL, "tensor_parallel_size": 2, "device": "cpu", "max_num_seqs": 8,
                    "max_queue_size": 16}, engine_factory=scripted_engine_factory(step_delay_s=0.01)) as handle:
        yield handle


def serve_processes() -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:raytp" in cmd or "ProxyActor" in cmd:
            procs.append(p)
    return procs


def rss_mb(procs) -> float:
    return sum(p.memory_info().rss for p in procs) / 2**20


async def one_client(http, i: int):
    body = {"model": MODEL, "prompt": [11 + i % 50, 12, 13], "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", URL + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, r.headers.get("retry-after"), json.loads(await r.aread())["error"]["type"]
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return 200, json.loads(events[-2])["usage"]["completion_tokens"], None


def test_200_streaming_clients_get_an_answer_or_429(app):
    import httpx

    procs = serve_processes()
    assert len(procs) >= 2  # the proxy and the replicas
    before = rss_mb(procs)

    async def main():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one_client(http, i) for i in range(CLIENTS)))

    results = asyncio.run(main())
    after = rss_mb(procs)
    ok = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 429]
    print(f"{CLIENTS} clients: {len(ok)} answered, {len(rejected)} rejected with 429; "
          f"serve processes RSS {before:.0f} -> {after:.0f} MB")
    assert len(ok) + len(rejected) == CLIENTS, {r[0] for r in results}
    assert len(ok) >= 8 and rejected  # the slots were used and the bound held
    assert all(tokens == MAX_TOKENS for _, tokens, _ in ok)
    assert all(retry == "1" and kind == "rate_limit_exceeded" for _, retry, kind in rejected)
    assert after - before < 300, "memory grew with the number of clients"
    # the server is healthy and idle afterwards
    import requests

    health = requests.get(URL + "/health", timeout=10).json()
    assert health["num_running"] == 0 and health["num_waiting"] == 0
