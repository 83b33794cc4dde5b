"""Fixtures shared by the integration tests."""

import pytest

from tests.conftest import serve_app


@pytest.fixture(scope="module")
def tp2_app(ray_session):
    """The tiny Llama as a TP=2 Serve app on :8000 (float32, 4 slots, max_model_len 256) for one module."""
    with serve_app({"model": "raytp-tiny-llama", "tensor_parallel_size": 2, "dtype": "float32", "device": "cpu",
                    "max_model_len": 256, "max_num_seqs": 4}) as handle:
        yield handle
