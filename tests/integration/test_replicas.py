"""num_replicas: 2 with TP=1 each: two placement groups, two gangs, both answering; optional API key."""

import concurrent.futures

import pytest
import requests

from tests.conftest import URL, serve_app

MODEL = "raytp-tiny-llama"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def app(ray_session):
    # num_replicas=2 is what `deployments: [{name: LLMServer, num_replicas: 2}]` does in serve_config.yaml
    with serve_app({"model": MODEL, "tensor_parallel_size": 1, "device": "cpu", "dtype": "float32", "api_key": KEY},
                   num_replicas=2) as handle:
        yield handle


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


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
    seen = {requests.get(URL + "/health", timeout=30).json()["replica_id"] for _ in range(40)}
    assert len(seen) == 2


def test_api_key_required_except_health(app):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    assert requests.post(URL + "/v1/completions", json=body, timeout=30).status_code == 401
    r = requests.post(URL + "/v1/completions", json=body, headers=auth("wrong"), timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert requests.get(URL + "/v1/models", timeout=30).status_code == 401
    assert requests.get(URL + "/v1/models", headers=auth(), timeout=30).status_code == 200
    assert requests.get(URL + "/health", timeout=30).status_code == 200
