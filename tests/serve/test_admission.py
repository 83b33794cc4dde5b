"""Admission control over HTTP: a full waiting queue answers 429 with Retry-After; nothing is dropped; a client
that disconnects aborts its request."""

import concurrent.futures

import pytest
import requests

from raytp.testing import scripted_engine_factory
from tests.conftest import URL, serve_app
from tests.serve.conftest import MODEL, check_disconnects_abort


@pytest.fixture(scope="module")
def app(ray_session):
    # 20 ms a step: a 40-token request holds its slot for about a second. A KV cache of 63 blocks of 16 tokens.
    with serve_app({"model": MODEL, "tensor_parallel_size": 1, "device": "cpu", "max_num_seqs": 2,
                    "max_queue_size": 2},
                   engine_factory=scripted_engine_factory(step_delay_s=0.02, num_kv_blocks=64)) as handle:
        yield handle


def test_queue_full_gets_429_and_everything_else_a_full_answer(app):
    def call(i):
        body = {"model": MODEL, "prompt": f"the model {i}", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                "stream": i % 2 == 0}
        r = requests.post(URL + "/v1/completions", json=body, timeout=120)
        if r.status_code == 429:
            return 429, r.headers.get("Retry-After"), r.json()["error"]["type"]
        text = r.text if body["stream"] else r.json()["usage"]["completion_tokens"]
        return r.status_code, text, None

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    statuses = [r[0] for r in results]
    print(f"12 requests against 2 slots + 2 queued: {statuses.count(200)} answered, {statuses.count(429)} got 429")
    assert len(results) == 12 and set(statuses) <= {200, 429}
    assert statuses.count(429) >= 1 and statuses.count(200) >= 4
    for status, detail, kind in results:
        if status == 429:
            assert detail == "1" and kind == "rate_limit_exceeded"
        elif isinstance(detail, int):
            assert detail == 40
        else:
            assert detail.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in detail
    ok = requests.post(URL + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_disconnected_streams_are_aborted(app):
    check_disconnects_abort(max_tokens=1000)  # 20 s at 20 ms a step


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_longer_than_the_whole_kv_cache_gets_400(app, stream):
    body = {"model": MODEL, "prompt": "the model", "max_tokens": 1010, "stream": stream}
    r = requests.post(URL + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "whole cache of this replica holds 1008" in error["message"]
    ok = requests.post(URL + "/v1/completions", json={**body, "max_tokens": 20}, timeout=60)
    assert ok.status_code == 200, "a request that fits is served"
