"""Bad input, generated: schemathesis fuzzes the HTTP API from raytp's own OpenAPI schema (valid and invalid
requests), hypothesis fuzzes the Python handle. Only 2xx or 4xx with OpenAI-style error bodies (Anthropic's on
its Messages routes) may come back, never a 5xx or an untyped exception, and the server keeps answering good
requests."""

import pytest
import requests

from raytp.testing import scripted_engine_factory
from tests.conftest import URL, serve_app

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from raytp.serve.ingress import app as fastapi_app  # noqa: E402

MODEL = "raytp-tiny-llama"
schema = schemathesis.openapi.from_dict(fastapi_app.openapi())
CASES = {"http": 0, "handle": 0}


@pytest.fixture(scope="module")
def app(ray_session):
    # small max_model_len: valid requests with huge max_tokens are rejected fast instead of generating for minutes
    with serve_app({"model": MODEL, "tensor_parallel_size": 1, "device": "cpu", "max_model_len": 64,
                    "max_num_seqs": 4}, engine_factory=scripted_engine_factory()) as handle:
        yield handle
    print(f"fuzz cases run: {CASES}")


def check_error_body(response, path: str) -> None:
    from raytp.api.anthropic import is_messages_path

    body = response.json()
    if is_messages_path(path):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["message"]
        return
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_http_api_never_answers_5xx(app, case):
    response = case.call(base_url=URL, timeout=60)
    CASES["http"] += 1
    assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
    if response.status_code >= 400:
        check_error_body(response, case.path)


def test_server_still_answers_after_http_fuzzing(app):
    body = {"model": MODEL, "prompt": "still fine", "max_tokens": 3}
    r = requests.post(URL + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                 st.text(max_size=40), st.lists(st.integers(-5, 2**40), max_size=8))
bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL), junk)},
    optional={"prompt": st.one_of(st.text(max_size=200), st.lists(st.integers(-3, 600), max_size=20), junk),
              "max_tokens": st.one_of(st.integers(-3, 80), junk), "temperature": st.one_of(st.floats(-1, 3), junk),
              "top_p": st.one_of(st.floats(-1, 2), junk), "top_k": st.one_of(st.integers(-3, 50), junk),
              "stop": st.one_of(st.lists(st.text(max_size=5), max_size=6), junk), "seed": junk, "n": junk,
              "logprobs": junk, "stream": st.booleans(), "bogus_field": junk},
)


@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_handle_raises_only_typed_errors(app, body):
    from raytp.errors import InvalidRequestError

    CASES["handle"] += 1
    body = {**body, "stream": False}
    try:
        out = app.completions.remote(body).result(timeout_s=60)
    except InvalidRequestError as e:  # 400 / 404: the typed errors bad input may raise
        assert e.message
        return
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] >= 1
