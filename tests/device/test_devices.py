"""Real-device checks: run only where torch sees at least two devices of the kind and Ray is installed; skipped
elsewhere (a lent single-GPU machine without Ray too). The skip checks come before any Ray fixture is set up."""

import pytest

from tests.conftest import run_gang


def _count(kind: str) -> int:
    import torch

    mod = getattr(torch, kind, None)
    try:
        return mod.device_count() if mod is not None and mod.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


@pytest.mark.parametrize("kind", [pytest.param("xpu", marks=pytest.mark.xpu),
                                  pytest.param("cuda", marks=pytest.mark.cuda)])
def test_tp2_on_device_matches_tp1(kind, request):
    if _count(kind) < 2:
        pytest.skip(f"needs 2 {kind} devices")
    pytest.importorskip("ray", reason="needs Ray (the TP=2 gang runs on Ray actors)")
    request.getfixturevalue("ray_session")  # only now: setting it up without Ray would be an error, not a skip
    prompt = request.getfixturevalue("tiny_tokenizer").encode("the model serves tokens")
    cfg = {"model": "raytp-tiny-llama", "device": kind, "dtype": "float32"}
    tp1 = run_gang({**cfg, "tensor_parallel_size": 1}, [[prompt]], 16)
    tp2 = run_gang({**cfg, "tensor_parallel_size": 2}, [[prompt]], 16)
    assert tp2 == tp1
