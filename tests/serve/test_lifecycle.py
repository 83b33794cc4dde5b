"""What clients get while no replica is ready yet, and when a replica's gang dies mid-stream (scripted gangs)."""

import json
import threading
import time

import pytest
import requests

from raytp.testing import scripted_engine_factory
from tests.conftest import PORT, URL, serve_app
from tests.serve.conftest import MODEL


def test_requests_before_any_replica_is_ready_get_503_at_once(ray_session):
    """While the model loads (4 s here), /health, /ping and completions answer 503 + Retry-After at once (/version
    answers); then 200."""
    from ray import serve

    from raytp.serve.app import bind_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    app = bind_app({"model": MODEL, "tensor_parallel_size": 1, "device": "cpu"},
                   engine_factory=scripted_engine_factory(start_delay_s=4))
    deploying = threading.Thread(target=serve.run, args=(app,), kwargs={"name": "raytp", "route_prefix": "/"})
    deploying.start()
    try:
        deadline = time.monotonic() + 60
        # Before the ingress replica runs, Serve's proxy answers by itself (404: no route yet; a plain-text 503)
        while "model_loading" not in requests.get(URL + "/health", timeout=10).text:
            assert time.monotonic() < deadline and deploying.is_alive()
            time.sleep(0.1)
        for method, path in (("GET", "/health"), ("GET", "/ping"), ("POST", "/v1/completions"),
                             ("POST", "/invocations")):
            t = time.monotonic()
            r = requests.request(method, URL + path, json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=30)
            took = time.monotonic() - t
            assert r.status_code == 503 and took < 2.5, (path, r.status_code, took)
            assert r.json()["error"]["code"] == "model_loading" and r.headers["Retry-After"] == "5"
        assert requests.get(URL + "/version", timeout=10).status_code == 200  # it says nothing about the model
        deploying.join(120)
        assert requests.get(URL + "/health", timeout=10).status_code == 200
    finally:
        deploying.join(120)
        serve.delete("raytp")


@pytest.mark.parametrize("ingress", ["separate", "in_server"])
def test_a_gang_dying_mid_stream_ends_the_stream_with_an_error_and_the_replica_is_replaced(ray_session, ingress):
    """A scripted gang failure (as a dead rank): the stream gets an error event and [DONE], queued and new
    requests get 503, and Serve replaces the replica, which then serves again (in_server: the replica that answers
    HTTP is the one that exits)."""
    factory = scripted_engine_factory(step_delay_s=0.01, fail_prompt="boom", fail_prompt_after=5)
    with serve_app({"model": MODEL, "tensor_parallel_size": 1, "device": "cpu", "ingress": ingress},
                   engine_factory=factory):
        before = requests.get(URL + "/health", timeout=30).json()["replica_id"]
        body = {"model": MODEL, "prompt": "boom now", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with requests.post(URL + "/v1/completions", json=body, stream=True, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "service_unavailable" and "scripted failure" in error["message"]
        deadline, after = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            r = requests.get(URL + "/health", timeout=30)
            if r.status_code == 200 and r.json()["replica_id"] != before:
                after = r.json()["replica_id"]
                break
            time.sleep(0.2)
        assert after, "the replica whose gang died was not replaced"
        r = requests.post(URL + "/v1/completions", json={"model": MODEL, "prompt": "fine", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
