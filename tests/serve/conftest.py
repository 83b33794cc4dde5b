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
