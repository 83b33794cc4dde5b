"""The trimmed Ray (``deploy/trim_ray.py``) still runs the README path: `serve run` of a config, one request answered
over HTTP, with the trimmed copy first on the path (the same removals the GPU machines' copy gets)."""

import os
import subprocess
import sys
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT = 8127
CONFIG = f"""
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {PORT}}}
applications:
  - name: raytp
    route_prefix: /
    import_path: raytp.serve.app:build_app
    args: {{model: raytp-tiny-llama, tensor_parallel_size: 1, device: cpu, dtype: float32}}
"""


def test_serve_run_with_the_trimmed_ray_answers(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "deploy"))
    import trim_ray

    tree = trim_ray.build(str(tmp_path / "ray"), None)
    for gone in trim_ray.REMOVED[:1] + trim_ray.REMOVED[2:]:
        assert not os.path.exists(os.path.join(tree, "ray", gone)), gone
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, ROOT]), "RAY_ADDRESS": "local"}
    serve = os.path.join(os.path.dirname(sys.executable), "serve")
    proc = subprocess.Popen([serve, "run", str(tmp_path / "cfg.yaml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{PORT}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        r = requests.post(f"http://127.0.0.1:{PORT}/v1/completions", timeout=60,
                          json={"prompt": "hello", "max_tokens": 4, "model": "raytp-tiny-llama"})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        # this Ray really is the trimmed copy: its dashboard serves the placeholder page in place of the UI
        assert "Trimmed Ray" in requests.get("http://127.0.0.1:8265/", timeout=10).text
    finally:
        os.killpg(proc.pid, 2)  # SIGINT: serve run shuts the app and its Ray instance down
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
