"""Autoscaling on time to first token through Serve (scripted gangs): under a load whose requests wait for a batch
slot, the replicas' TTFT p90 passes the target and Serve adds a replica (a second placement group); once the load
stops, it goes back to one."""

import time

from raytp.testing import scripted_engine_factory
from tests.conftest import URL, StreamingLoad, serve_app
from tests.serve.conftest import MODEL


def placement_groups() -> int:
    from ray.util import placement_group_table

    return len([pg for pg in placement_group_table().values() if pg["state"] == "CREATED"])


def running_servers() -> int:
    from ray import serve

    return serve.status().applications["raytp"].deployments["LLMServer"].replica_states.get("RUNNING", 0)


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def test_ttft_policy_adds_a_replica_under_load_and_removes_it_after(ray_session):
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2,
                   "upscale_delay_s": 0, "downscale_delay_s": 3,
                   "policy": {"policy_function": "raytp.serve.autoscaling:TTFTPolicy",
                              "policy_kwargs": {"target_ttft_s": 0.3}}}
    # one batch slot and 20 ms steps: 6 streaming clients of 12 tokens wait ~1 s each for the slot
    args = {"model": MODEL, "tensor_parallel_size": 1, "device": "cpu", "max_num_seqs": 1}
    with serve_app(args, engine_factory=scripted_engine_factory(step_delay_s=0.02), autoscaling_config=autoscaling):
        assert placement_groups() == 1
        with StreamingLoad(URL, MODEL, clients=6) as load:
            assert wait_for(lambda: placement_groups() == 2, 90), "no replica added under load"
            # the added replica finished starting (its gang is up); not /health's replica ids: /health goes by
            # power of two choices, which under this load keeps picking the replica with the shorter queue
            assert wait_for(lambda: running_servers() == 2, 60), "the added replica never reached RUNNING"
        assert load.done > 10 and not load.failures, load.failures[:3]
        assert wait_for(lambda: placement_groups() == 1, 60), "the added replica was not removed when idle"
