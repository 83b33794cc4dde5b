"""The README path: `serve run serve_config.yaml` as a subprocess, answered over HTTP, shut down cleanly."""

import glob
import os
import signal
import subprocess
import sys
import time

import requests
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT = 8123


def test_serve_run_default_config(tmp_path):
    with open(os.path.join(ROOT, "serve_config.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["applications"][0]["args"]["tensor_parallel_size"] == 2
    config["http_options"]["port"] = PORT  # the only change: keep clear of other tests' port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a cluster of its own, as on a fresh machine
    log = open(tmp_path / "serve.log", "w")
    # SIGINT back to its default in the child: a shell that started this run in the background ignores it, and
    # an ignored SIGINT is inherited (serve run would never see Ctrl-C)
    proc = subprocess.Popen([serve_bin, "run", str(path)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started = time.monotonic()
    try:
        healthy = None
        while time.monotonic() - started < 180 and proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{PORT}/health", timeout=5).status_code == 200:
                    healthy = time.monotonic() - started
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(1)
        assert healthy is not None, (tmp_path / "serve.log").read_text()[-3000:]
        print(f"serve run → healthy in {healthy:.1f}s")
        r = requests.post(f"http://127.0.0.1:{PORT}/v1/completions",
                          json={"model": "raytp-tiny-llama", "prompt": "the model", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert requests.get(f"http://127.0.0.1:{PORT}/health", timeout=5).json()["tensor_parallel_size"] == 2
        # the ranks unlinked DeepSpeed's shm buffers once mapped: nothing to leak however serve run ends
        assert glob.glob("/dev/shm/deepspeed_allreduce_buffer_*") == []
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
    try:
        requests.get(f"http://127.0.0.1:{PORT}/health", timeout=2)
        raise AssertionError("server still answering after shutdown")
    except requests.ConnectionError:
        pass
