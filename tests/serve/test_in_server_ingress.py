"""``ingress: in_server``: one deployment whose replicas answer HTTP and own their gang (scripted here). The same
HTTP, SSE, error, handle and disconnect tests as the two-deployment app, run against this layout; then what only
this layout has (no OpenAIIngress deployment, the API key still out of the server's config, Serve's hooks)."""

import json

import pytest
import requests

from raytp.testing import scripted_engine_factory
from tests.conftest import URL, serve_app
from tests.serve.conftest import ARGS, MODEL, check_disconnects_abort
from tests.serve.test_http_api import (  # noqa: F401 - collected here against this module's app
    test_bad_requests_get_openai_errors_and_server_keeps_serving,
    test_chat_streaming_with_usage,
    test_completion_greedy_deterministic_with_usage,
    test_concurrent_requests_do_not_interleave,
    test_handle_generate_and_stream,
    test_handle_streams_and_the_messages_and_responses_apis,
    test_health_reports_loaded_gang,
    test_invalid_json_and_unknown_route,
    test_oversized_bodies_get_413_and_the_server_keeps_answering,
    test_placement_group_has_one_bundle_per_rank,
    test_stop_string_is_cut,
    test_streaming_equals_non_streaming,
)

KEY = "in-server-key"


@pytest.fixture(scope="module")
def app(ray_session):
    # 5 ms a step: the disconnect test's 250-token streams run for 1.25 s, long after their clients leave
    with serve_app({**ARGS, "ingress": "in_server", "api_key": KEY},
                   engine_factory=scripted_engine_factory(step_delay_s=0.005)) as handle:
        yield handle


@pytest.fixture(autouse=True)
def _send_the_key(monkeypatch):
    """The shared tests send no key: every request of this module carries it (those about keys below drop it)."""
    original = requests.Session.request

    def with_key(self, method, url, headers=None, **kw):
        headers = dict(headers or {})
        headers.setdefault("Authorization", f"Bearer {KEY}")
        return original(self, method, url, headers=headers, **kw)

    monkeypatch.setattr(requests.Session, "request", with_key)


def test_one_deployment_named_llmserver_serves_http(app):
    from ray import serve

    app = serve.status().applications["raytp"]
    assert set(app.deployments) == {"LLMServer"}
    assert app.deployments["LLMServer"].replica_states.get("RUNNING") == 1
    server = serve.get_deployment_handle("LLMServer", app_name="raytp")
    assert server.models.remote().result()["data"][0]["id"] == MODEL  # the handle API on the same deployment
    assert len(server.worker_pids.remote().result()) == 2  # the scripted "ranks"


def test_the_api_key_is_checked_and_stays_out_of_the_servers_config(app):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    assert requests.post(URL + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"},
                         timeout=30).status_code == 401
    assert requests.post(URL + "/v1/completions", json=body, timeout=30).status_code == 200
    assert requests.get(URL + "/health", headers={"Authorization": ""}, timeout=30).status_code == 200
    from raytp.serve.app import bind_app

    bound = bind_app({**ARGS, "ingress": "in_server", "api_key": KEY})
    in_server, key = bound._bound_deployment.init_args[:2]
    assert key == KEY and in_server.cfg.api_key is None


def test_streams_carry_one_event_per_token(app):
    body = {"model": MODEL, "prompt": "the model serves", "max_tokens": 9, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True}
    r = requests.post(URL + "/v1/completions", json=body, timeout=60, stream=True)
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    choices = [json.loads(e)["choices"][0] for e in events[:-1] if json.loads(e)["choices"]]
    assert [len(c["logprobs"]["tokens"]) for c in choices if c["logprobs"]] == [1] * 9



def test_a_client_that_goes_away_aborts_its_request(app):
    check_disconnects_abort(max_tokens=250)  # 1.25 s at 5 ms a step, within max_model_len
