"""A version switch is invisible to clients (issue 28): while 8 clients stream completions in a loop, the app is
redeployed with one engine argument changed; Serve replaces the server (and ingress) replicas, the new server
replica taking seconds to load, and every request completes: no 503, no error event, no cut stream."""

import threading
import time

import requests

from raytp.testing import scripted_engine_factory
from tests.conftest import URL
from tests.serve.conftest import MODEL

ARGS = {"model": MODEL, "tensor_parallel_size": 1, "device": "cpu", "max_model_len": 256}


def stream_once(i: int) -> tuple[int, str]:
    body = {"model": MODEL, "prompt": f"client {i}", "max_tokens": 12, "ignore_eos": True, "stream": True}
    try:
        with requests.post(URL + "/v1/completions", json=body, stream=True, timeout=120) as r:
            if r.status_code != 200:
                return r.status_code, r.text[:200]
            events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    except requests.RequestException as e:
        return 0, repr(e)
    bad = [e for e in events if '"error"' in e]
    if bad or not events or events[-1] != "[DONE]" or len(events) != 13:
        return 200, f"{len(events)} events, last {events[-1:]}, errors {bad[:1]}"
    return 200, "ok"


def test_redeploying_a_changed_config_under_streaming_load_fails_no_request(ray_session):
    from ray import serve

    from raytp.serve.app import bind_app

    factory = scripted_engine_factory(step_delay_s=0.02, start_delay_s=3)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(bind_app({**ARGS, "max_num_seqs": 8}, engine_factory=factory), name="raytp", route_prefix="/")
    try:
        before = requests.get(URL + "/health", timeout=30).json()["replica_id"]
        results: list[tuple[int, str]] = []
        stop = threading.Event()

        def client(i):
            while not stop.is_set():
                results.append(stream_once(i))

        clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in clients:
            t.start()
        time.sleep(2)
        # blocks until the new version is running (its server replica loaded: 3 s here) and the old one is gone
        serve.run(bind_app({**ARGS, "max_num_seqs": 6}, engine_factory=factory), name="raytp", route_prefix="/")
        time.sleep(2)  # traffic on the new version only
        stop.set()
        for t in clients:
            t.join(120)
        after = requests.get(URL + "/health", timeout=30).json()["replica_id"]
        assert after != before, "the server replica was not replaced"
        failed = [r for r in results if r != (200, "ok")]
        assert len(results) > 50 and not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    finally:
        serve.delete("raytp")
