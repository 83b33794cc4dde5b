"""num_replicas: 2 real gangs (TP=1 each): a rank killed in one replica leaves the other serving while Serve
replaces the broken one; redeploying with fewer replicas, or deleting the app, drains in-flight streams first.
(Two replicas answering and the API key are tested over scripted gangs in tests/serve/.)"""

import pytest
import requests

from tests.conftest import URL, serve_app

MODEL = "raytp-tiny-llama"


@pytest.fixture(scope="module")
def app(ray_session):
    # num_replicas=2 is what `deployments: [{name: LLMServer, num_replicas: 2}]` does in serve_config.yaml
    with serve_app({"model": MODEL, "tensor_parallel_size": 1, "device": "cpu", "dtype": "float32"},
                   num_replicas=2) as handle:
        yield handle


def test_killing_a_rank_of_one_replica_leaves_the_other_serving(app):
    import os
    import signal
    import threading
    import time

    from ray import serve

    victim = serve.get_deployment_handle("LLMServer", app_name="raytp").worker_pids.remote().result()
    before = {requests.get(URL + "/health", timeout=10).json()["replica_id"] for _ in range(20)}
    stop, results = threading.Event(), []  # (time, status, error type)

    def client(i):
        while not stop.is_set():
            r = requests.post(URL + "/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": f"the model {i}", "max_tokens": 8, "temperature": 0})
            results.append((time.monotonic(), r.status_code, r.json().get("error", {}).get("type")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    killed_at = time.monotonic()
    os.kill(victim[0], signal.SIGKILL)
    # wait until the replacement answers /health: a replica id not seen before the kill
    deadline, new = time.monotonic() + 150, set()
    while not new and time.monotonic() < deadline:
        r = requests.get(URL + "/health", timeout=10)
        if r.status_code == 200:
            new = {r.json()["replica_id"]} - before
        time.sleep(0.2)
    recovered_in = time.monotonic() - killed_at
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(60)
    after = [r for r in results if r[0] > killed_at]
    failed = [r for r in after if r[1] != 200]
    print(f"kill -9 in one of 2 replicas: {len(after) - len(failed)} requests served, {len(failed)} failed "
          f"(all within {max((r[0] - killed_at for r in failed), default=0):.1f}s of the kill), "
          f"replacement replica healthy after {recovered_in:.1f}s")
    assert new, "the broken replica was not replaced"
    assert all(status == 503 and kind == "service_unavailable" for _, status, kind in failed)
    # only requests on, or routed to, the dead gang before its replica exited may fail: the replica finds its dead
    # gang at its next request or Serve's next health check (every 2 s, ``LLMServer.check_health`` pings the ranks)
    # and exits at once, even when no request reaches it (prefix routing can keep it idle)
    assert all(t - killed_at < 10 for t, _, _ in failed), [round(t - killed_at, 1) for t, _, _ in failed]
    assert len(after) - len(failed) >= 20, "the healthy replica did not keep serving"


def test_a_rank_killed_while_no_request_runs_is_found_by_the_health_check(app):
    """No request reaches the broken replica (an idle gang, or prefix routing sending its keys elsewhere): Serve's
    health check (``LLMServer.check_health`` pings the ranks every 2 s) finds the dead rank, the replica exits, and
    Serve replaces it without a request ever failing on it."""
    import os
    import signal
    import time

    from ray import serve

    def running() -> int:
        return serve.status().applications["raytp"].deployments["LLMServer"].replica_states.get("RUNNING", 0)

    victim = serve.get_deployment_handle("LLMServer", app_name="raytp").worker_pids.remote().result()
    assert running() == 2
    os.kill(victim[0], signal.SIGKILL)
    killed_at, deadline = time.monotonic(), time.monotonic() + 30
    while running() == 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    noticed_in = time.monotonic() - killed_at
    assert noticed_in < 30, "the replica with a dead rank stayed RUNNING with no request to find it"
    deadline = time.monotonic() + 150
    while running() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"idle replica with a killed rank left RUNNING after {noticed_in:.1f}s; replaced after "
          f"{time.monotonic() - killed_at:.1f}s")
    assert running() == 2, "the replica was not replaced"


def streams_across(action, n: int) -> list[tuple]:
    """Start ``n`` streams of 600 tokens, run ``action()`` once all of them are producing tokens, and return
    each stream's (HTTP status, completion tokens from its usage chunk, last SSE event)."""
    import concurrent.futures
    import json
    import threading

    started = threading.Barrier(n + 1)

    def long_stream(i):
        body = {"model": MODEL, "prompt": f"the model {i}", "max_tokens": 600, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with requests.post(URL + "/v1/completions", json=body, stream=True, timeout=120) as r:
            lines = r.iter_lines(decode_unicode=True)
            events = [next(lines)]
            started.wait(60)
            events += [line for line in lines if line]
        data = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
        return r.status_code, data[-1].get("usage", {}).get("completion_tokens"), events[-1]

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(long_stream, i) for i in range(n)]
        started.wait(60)
        action()
        return [f.result(timeout=180) for f in futures]


def test_redeploy_with_fewer_replicas_drains_in_flight_requests(app):
    from ray import serve
    from ray.util import placement_group_table

    from raytp.serve.app import bind_app

    args = {"model": MODEL, "tensor_parallel_size": 1, "device": "cpu", "dtype": "float32"}
    # redeploy with one replica while 4 streams run on the two: Serve stops replicas (and may replace the rest);
    # each drains first
    results = streams_across(lambda: serve.run(bind_app(args, server_options={"num_replicas": 1}),
                                               name="raytp", route_prefix="/"), 4)
    assert results == [(200, 600, "data: [DONE]")] * 4, results
    created = [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]
    assert len(created) == 1
    r = requests.post(URL + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "still here", "max_tokens": 4})
    assert r.status_code == 200


def test_deleting_the_app_drains_in_flight_streams(app):
    """`serve shutdown` / `serve delete` stop replicas the same way: in-flight streams finish first."""
    import time

    from ray import serve

    took = []

    def delete():  # returns once the app's replicas are gone
        t = time.monotonic()
        serve.delete("raytp")
        took.append(time.monotonic() - t)

    results = streams_across(delete, 2)
    assert results == [(200, 600, "data: [DONE]")] * 2, results
    print(f"app deleted after {took[0]:.1f}s, both streams complete")
