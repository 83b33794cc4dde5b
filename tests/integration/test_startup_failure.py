"""A replica that cannot start (corrupt weights) fails the deployment with the cause, after a few tries,
instead of restarting for ever without a message; its ranks and placement groups are cleaned up."""

import shutil
import time

import pytest

from tests.conftest import PORT


def test_corrupt_weights_fail_the_deployment_with_the_cause(ray_session, tiny_model_path, tmp_path):
    from ray import serve
    from ray.util import placement_group_table

    from raytp.serve.app import bind_app

    broken = tmp_path / "broken-llama"
    shutil.copytree(tiny_model_path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download

    config = {"model": str(broken), "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32"}
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as info:
            serve.run(bind_app(config, server_options={"max_constructor_retry_count": 1}), name="broken",
                      route_prefix="/")
        elapsed = time.monotonic() - started
        assert "LLMServer" in str(info.value) and elapsed < 180
        status = serve.status().applications["broken"]
        message = status.deployments["LLMServer"].message
        print(f"deployment failed after {elapsed:.0f}s; serve status says: {message[-400:]}")
        assert status.status == "DEPLOY_FAILED" and status.deployments["LLMServer"].status == "DEPLOY_FAILED"
        assert "raytp" in message and "load_model" in message and "safetensor" in message.lower(), message
    finally:
        serve.delete("broken")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]:
            break
        time.sleep(1)
    assert not [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"], "placement groups leaked"
