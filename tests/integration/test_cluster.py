"""A two-node Ray cluster on this machine (`ray start --head` + `ray start --address`), as on bare metal:
raytp with 2 replicas; each node has room for one TP=2 gang (2 CPUs), so each gang is packed on its own node."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import psutil

PORT = 8124
DRIVER = r"""
import json, sys, time
import ray, requests
from ray import serve
from ray.util import placement_group_table
from raytp.serve.app import bind_app
from raytp.testing import scripted_engine_factory

ray.init(address=sys.argv[1])
serve.start(http_options={"host": "127.0.0.1", "port": %(port)d}, proxy_location="HeadOnly")
config = ({"model": "raytp-tiny-llama", "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32",
                  "num_cpus_per_worker": 1})
# placement is Serve's and Ray's work: a scripted gang is enough to see where each TP group's bundles land
serve.run(bind_app(config, engine_factory=scripted_engine_factory(), server_options={"num_replicas": 2}),
          name="raytp", route_prefix="/")
url = "http://127.0.0.1:%(port)d"
replicas = set()
for i in range(40):
    r = requests.post(url + "/v1/completions", json={"model": "raytp-tiny-llama", "prompt": f"n {i}", "max_tokens": 3},
                      timeout=60)
    assert r.status_code == 200, r.text
    replicas.add(requests.get(url + "/health", timeout=30).json()["replica_id"])
pgs = [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]
print("RESULT " + json.dumps({
    "nodes": len([n for n in ray.nodes() if n["Alive"]]),
    "replicas": len(replicas),
    "pg_nodes": [sorted(set(pg["bundles_to_node_id"].values())) for pg in pgs],
    "pg_bundles": [len(pg["bundles"]) for pg in pgs],
}))
serve.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_cluster(marker: str) -> None:
    """Stop only this test's Ray processes (`ray stop` would also stop the test session's own Ray)."""
    mine = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAYTP_TEST_CLUSTER") == marker:
                p.kill()
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    _, alive = psutil.wait_procs(mine, timeout=20)
    assert not alive, f"cluster processes survived: {alive}"


def forget_cluster(gcs: str) -> None:
    """`ray start --head` records its address for later `ray.init()` calls; `ray stop` would remove it."""
    path = "/tmp/ray/ray_current_cluster"
    if os.path.exists(path) and open(path).read().strip() == gcs:
        os.remove(path)


def test_two_node_cluster_places_one_gang_per_node(tmp_path):
    marker = uuid.uuid4().hex
    # RAY_AUTH_MODE=token: Ray 2.60's default for a new cluster; the joining node and the driver need it set
    # to send the token (~/.ray/auth_token) that `ray start --head` uses.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAYTP_TEST_CLUSTER": marker,
                                                                         "RAY_AUTH_MODE": "token"}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    import ray

    port = free_port()
    gcs = f"{ray.util.get_node_ip_address()}:{port}"
    common = ["--num-cpus", "2", "--disable-usage-stats"]
    try:
        for cmd in (["--head", "--port", str(port), "--include-dashboard", "false"], ["--address", gcs]):
            proc = subprocess.run([ray_bin, "start", *cmd, *common], env=env, capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        script = tmp_path / "driver.py"
        script.write_text(DRIVER % {"port": PORT})
        started = time.monotonic()
        proc = subprocess.run([sys.executable, str(script), gcs], env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        print(f"two-node cluster: {result} in {time.monotonic() - started:.0f}s")
    finally:
        kill_cluster(marker)
        forget_cluster(gcs)
    assert result["nodes"] == 2 and result["replicas"] == 2
    assert result["pg_bundles"] == [2, 2]
    assert all(len(nodes) == 1 for nodes in result["pg_nodes"]), "a gang spans nodes"
    assert result["pg_nodes"][0] != result["pg_nodes"][1], "both gangs on one node"

