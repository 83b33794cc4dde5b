"""A version switch is invisible to clients (issue 28): while 8 clients stream completions in a loop, the app is
redeployed with one engine argument changed; Serve replaces the server (and ingress) replicas, the new server
replica taking seconds to load, and every request completes: no 503, no error event, no cut stream. (The same
through `serve deploy` with a real gang: tests/integration/test_serve_deploy.py.)"""

import time

import requests

from raytp.testing import scripted_engine_factory
from tests.conftest import PORT, URL, StreamingLoad
from tests.serve.conftest import MODEL

ARGS = {"model": MODEL, "tensor_parallel_size": 1, "device": "cpu", "max_model_len": 256}


def test_redeploying_a_changed_config_under_streaming_load_fails_no_request(ray_session):
    from ray import serve

    from raytp.serve.app import bind_app

    factory = scripted_engine_factory(step_delay_s=0.02, start_delay_s=3)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(bind_app({**ARGS, "max_num_seqs": 8}, engine_factory=factory), name="raytp", route_prefix="/")
    try:
        before = requests.get(URL + "/health", timeout=30).json()["replica_id"]
        with StreamingLoad(URL, MODEL) as load:
            time.sleep(2)
            # returns once the new version is running (its server replica loaded: 3 s here) and the old one gone
            serve.run(bind_app({**ARGS, "max_num_seqs": 6}, engine_factory=factory), name="raytp", route_prefix="/")
            time.sleep(2)  # traffic on the new version only
        after = requests.get(URL + "/health", timeout=30).json()["replica_id"]
        assert after != before, "the server replica was not replaced"
        assert load.done > 50 and not load.failures, \
            f"{len(load.failures)} of {load.done} requests failed: {load.failures[:5]}"
    finally:
        serve.delete("raytp")
