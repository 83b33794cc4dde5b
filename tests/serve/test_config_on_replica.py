"""Config that depends on a node is resolved in the replica: a model directory missing on the replica's node, or
a KV-cache budget that holds no block once the ranks have loaded, fails the deployment with the field named, as
`serve status` shows it."""

import time

import pytest

from raytp.testing import scripted_engine_factory
from tests.conftest import PORT


def fails_deploy_naming(config: dict, expected: str, engine_factory=None) -> None:
    from ray import serve
    from ray.util import placement_group_table

    from raytp.serve.app import bind_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        app = bind_app(config, engine_factory=engine_factory,
                       server_options={"max_constructor_retry_count": 1})  # builds: no path is touched here
        started = time.monotonic()
        with pytest.raises(RuntimeError):
            serve.run(app, name="badcfg", route_prefix="/")
        status = serve.status().applications["badcfg"]
        message = status.deployments["LLMServer"].message
        print(f"deployment failed after {time.monotonic() - started:.0f}s; serve status says: {message[-300:]}")
        assert status.status == "DEPLOY_FAILED"
        assert expected in message
    finally:
        serve.delete("badcfg")
    deadline = time.monotonic() + 30
    while [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"], "placement groups leaked"


def test_missing_model_dir_fails_the_deployment_naming_the_field(ray_session):
    fails_deploy_naming({"model": "/models/not-on-this-node", "tensor_parallel_size": 2, "device": "cpu"},
                        "raytp config field 'model': directory '/models/not-on-this-node' does not exist on this node")


def test_kv_budget_below_one_block_fails_the_deployment_naming_the_field(ray_session):
    fails_deploy_naming({"model": "raytp-tiny-llama", "tensor_parallel_size": 1, "device": "cpu"},
                        "raytp config field 'kv_cache_memory_bytes': the KV cache budget holds 0 usable blocks",
                        engine_factory=scripted_engine_factory(num_kv_blocks=1))
