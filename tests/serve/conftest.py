"""The Serve-layer tests: the real ingress, server and engine over a scripted gang (``raytp.testing``), so HTTP,
SSE, errors, auth, admission, disconnects, handles and metrics are tested in seconds, without ranks or weights.
What needs a real gang (TP parity, faults, drain, deploy) is in tests/integration/."""

import pytest

from raytp.testing import scripted_engine_factory
from tests.conftest import serve_app

MODEL = "raytp-tiny-llama"
ARGS = {"model": MODEL, "tensor_parallel_size": 2, "device": "cpu", "max_model_len": 256, "max_num_seqs": 4}


@pytest.fixture(scope="module")
def app(ray_session):
    """A TP=2-shaped app (placement group of 2 bundles) whose gang is scripted: each step takes 2 ms."""
    with serve_app(ARGS, engine_factory=scripted_engine_factory(step_delay_s=0.002)) as handle:
        yield handle


def check_disconnects_abort(max_tokens: int) -> None:
    """Two streams whose clients leave after the first event are aborted in the engine, not run to ``max_tokens``
    (which must outlast the hand-off of a disconnect), and nothing stays running."""
    import time

    import requests

    from tests.conftest import URL

    def finished():
        return requests.get(URL + "/health", timeout=10).json()["num_finished"]

    before = finished()
    body = {"model": MODEL, "prompt": "the model", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    responses = [requests.post(URL + "/v1/completions", json=body, stream=True, timeout=60) for _ in range(2)]
    for r in responses:
        next(r.iter_lines())  # first chunk arrived: the request is running
        r.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while finished().get("abort", 0) < before.get("abort", 0) + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = finished()
    assert after.get("abort", 0) == before.get("abort", 0) + 2
    assert after.get("length", 0) == before.get("length", 0), "the requests were cut short, not run to max_tokens"
    assert requests.get(URL + "/health", timeout=10).json()["num_running"] == 0
