"""Issue 28's reproduction, as a user runs it: a local Ray cluster (`ray start --head`, with its dashboard), `serve
deploy` of a config with the tiny model (1 replica, TP=1 on 1 CPU, so a new replica fits beside the old), 8 clients
streaming completions in a loop, then `serve deploy` of the same config with one engine argument changed
(`max_num_seqs`): the new gang loads beside the old one, the old one drains, and every request completes."""

import os
import subprocess
import sys
import time
import uuid

import requests
import yaml

from tests.conftest import StreamingLoad
from tests.integration.test_cluster import forget_cluster, free_port, kill_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT = 8125
MODEL = "raytp-tiny-llama"


def write_config(path, max_num_seqs: int) -> str:
    with open(os.path.join(ROOT, "serve_config.yaml")) as f:
        config = yaml.safe_load(f)
    config["http_options"]["port"] = PORT
    # eager: this test is about the redeploy (test_serve_run.py starts serve_config.yaml as it is, compiling)
    config["applications"][0]["args"].update(model=MODEL, tensor_parallel_size=1, num_cpus_per_worker=1,
                                             dtype="float32", max_num_seqs=max_num_seqs, compile_model=False)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def app_settled(bin_dir: str, dashboard: str, env: dict) -> bool:
    """`serve status`: the app RUNNING with exactly one server replica, RUNNING (none starting or stopping)."""
    out = subprocess.run([os.path.join(bin_dir, "serve"), "status", "--address", dashboard], env=env,
                         capture_output=True, text=True, timeout=60).stdout
    app = (yaml.safe_load(out) or {}).get("applications", {}).get("raytp", {})
    server = app.get("deployments", {}).get("LLMServer", {})
    return app.get("status") == "RUNNING" and server.get("replica_states") == {"RUNNING": 1}


def test_serve_deploy_of_a_changed_config_under_streaming_load_fails_no_request(tmp_path):
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAYTP_TEST_CLUSTER": marker,
                                                                         "RAY_AUTH_MODE": "token"}
    bin_dir = os.path.dirname(sys.executable)
    import ray

    port, dash_port = free_port(), free_port()
    gcs, dashboard, url = (f"{ray.util.get_node_ip_address()}:{port}", f"http://127.0.0.1:{dash_port}",
                           f"http://127.0.0.1:{PORT}")
    try:
        proc = subprocess.run([os.path.join(bin_dir, "ray"), "start", "--head", "--port", str(port),
                               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port), "--num-cpus", "2",
                               "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

        def deploy(max_num_seqs: int) -> None:
            path = write_config(tmp_path / f"config_{max_num_seqs}.yaml", max_num_seqs)
            proc = subprocess.run([os.path.join(bin_dir, "serve"), "deploy", path, "--address", dashboard], env=env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

        deploy(8)
        deadline = time.monotonic() + 240
        while not app_settled(bin_dir, dashboard, env):
            assert time.monotonic() < deadline, "the first deploy did not become healthy"
            time.sleep(2)
        before = requests.get(url + "/health", timeout=30).json()["replica_id"]
        with StreamingLoad(url, MODEL) as load:
            time.sleep(3)
            deploy(6)
            deadline = time.monotonic() + 240
            while requests.get(url + "/health", timeout=30).json().get("replica_id") == before or \
                    not app_settled(bin_dir, dashboard, env):
                assert time.monotonic() < deadline, "the update did not finish"
                time.sleep(2)
            time.sleep(3)  # traffic on the new version only
        print(f"serve deploy under load: {load.done} requests, {len(load.failures)} failed")
        assert load.done > 30 and not load.failures, \
            f"{len(load.failures)} of {load.done} requests failed: {load.failures[:5]}"
    finally:
        kill_cluster(marker)
        forget_cluster(gcs)
