"""num_replicas: 2 (two placement groups, both answering), the optional API key, and ``stream_interval``
(scripted gangs)."""

import concurrent.futures
import time

import pytest
import requests

from raytp.testing import scripted_engine_factory
from tests.conftest import URL, serve_app
from tests.serve.conftest import MODEL

KEY = "test-key-123"


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def app(ray_session):
    # num_replicas=2 is what `deployments: [{name: LLMServer, num_replicas: 2}]` does in serve_config.yaml
    with serve_app({"model": MODEL, "tensor_parallel_size": 1, "device": "cpu", "api_key": KEY, "stream_interval": 4},
                   engine_factory=scripted_engine_factory(step_delay_s=0.002), num_replicas=2) as handle:
        yield handle


def test_two_placement_groups(app):
    from ray.util import placement_group_table

    created = [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]
    assert len(created) == 2 and all(len(pg["bundles"]) == 1 for pg in created)


def test_both_replicas_answer(app):
    def complete(i):
        r = requests.post(URL + "/v1/completions", headers=auth(), timeout=60,
                          json={"model": MODEL, "prompt": f"the model {i}", "max_tokens": 4, "temperature": 0})
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(complete, range(16))) == {200}
    # Serve's router may keep choosing one replica for a while (and a replica can reach this ingress's router a
    # moment after it is ready): ask until both have answered, within a bound, rather than a fixed 40 times
    seen, deadline = set(), time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.add(requests.get(URL + "/health", timeout=30).json()["replica_id"])
    assert len(seen) == 2


def finished_per_replica() -> dict[str, int]:
    """Each replica's count of finished requests (/health reaches a random replica: ask until both answered)."""
    counts, deadline = {}, time.monotonic() + 60
    while len(counts) < 2 and time.monotonic() < deadline:
        health = requests.get(URL + "/health", timeout=30).json()
        counts[health["replica_id"]] = sum(health["num_finished"].values())  # by finish reason
    assert len(counts) == 2
    return counts


def test_one_conversations_requests_go_to_one_replica(app):
    """Prefix routing (on by default): the turns of a conversation (same system and first user message), streamed
    or not, all reach the replica whose prefix cache holds it, while the replicas' queues stay balanced."""
    before = finished_per_replica()
    history = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Plan a trip"}]
    for turn in range(8):
        r = requests.post(URL + "/v1/chat/completions", headers=auth(), timeout=60,
                          json={"model": MODEL, "messages": history, "max_tokens": 3, "stream": turn % 2 == 1})
        assert r.status_code == 200, r.text
        history += [{"role": "assistant", "content": f"answer {turn}"}, {"role": "user", "content": f"and {turn}?"}]
    after = finished_per_replica()
    assert sorted(after[k] - before[k] for k in after) == [0, 8]


def test_api_key_required_except_health_ping_and_version(app):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    assert requests.post(URL + "/v1/completions", json=body, timeout=30).status_code == 401
    r = requests.post(URL + "/v1/completions", json=body, headers=auth("wrong"), timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert requests.get(URL + "/v1/models", timeout=30).status_code == 401
    assert requests.get(URL + "/v1/models", headers=auth(), timeout=30).status_code == 200
    assert requests.get(URL + "/health", timeout=30).status_code == 200
    # vLLM's operational routes: /ping and /version without a key, /invocations (it generates) with one
    assert requests.get(URL + "/ping", timeout=30).status_code == requests.get(URL + "/version", timeout=30) \
        .status_code == 200
    assert requests.post(URL + "/invocations", json=body, timeout=30).status_code == 401
    assert requests.post(URL + "/invocations", data="{not json", timeout=30).status_code == 401  # key first
    assert requests.post(URL + "/invocations", json=body, headers=auth(), timeout=30).status_code == 200


def test_the_responses_routes_need_the_api_key(app):
    body = {"model": MODEL, "input": "x", "max_output_tokens": 2}
    assert requests.post(URL + "/v1/responses", json=body, timeout=30).status_code == 401
    # the key is checked before the previous id: a caller without it learns nothing about stored ids
    r = requests.post(URL + "/v1/responses", json={**body, "previous_response_id": "resp_x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    created = requests.post(URL + "/v1/responses", json=body, headers=auth(), timeout=30)
    assert created.status_code == 200, created.text
    stored = URL + "/v1/responses/" + created.json()["id"]
    assert requests.get(stored, timeout=30).status_code == requests.post(stored + "/cancel", timeout=30) \
        .status_code == 401
    assert requests.get(stored, headers=auth(), timeout=30).json() == created.json()


def test_api_key_stays_in_the_ingress(app):
    from ray import serve

    server = serve.get_deployment_handle("LLMServer", app_name="raytp")
    # the config the server replicas were given (what Serve shipped to them) has no key
    assert server.models.remote().result()["data"][0]["id"] == MODEL
    from raytp.serve.app import bind_app

    bound = bind_app({"model": MODEL, "device": "cpu", "api_key": KEY})
    server_args = bound._bound_deployment.init_args[0]._bound_deployment.init_args
    assert server_args[0].api_key is None and KEY not in repr(server_args)


def test_stream_interval_keeps_one_sse_event_per_token(app):
    """``stream_interval: 4`` groups chunks on their way to the client; the client still gets one event per token,
    the text the same request gets unstreamed, then [DONE]."""
    body = {"model": MODEL, "prompt": "the model serves", "max_tokens": 11, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}  # each event's tokens listed: a token whose text is held back still shows
    whole = requests.post(URL + "/v1/completions", headers=auth(), json=body, timeout=60).json()
    r = requests.post(URL + "/v1/completions", headers=auth(), json={**body, "stream": True}, timeout=60, stream=True)
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    choices = [json.loads(e)["choices"][0] for e in events[:-1] if json.loads(e)["choices"]]
    per_event = [len(c["logprobs"]["tokens"]) for c in choices if c["logprobs"]]
    assert per_event == [1] * 11, per_event
    assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
