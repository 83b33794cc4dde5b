"""A real TP=2 gang behind the real Serve app. Healthy: the HTTP answer is the model's own greedy output, /health
shows the loaded ranks, the request id reaches every rank's log and the prompt never does. Broken: a rank killed
with SIGKILL, or stopped with SIGSTOP, mid-stream: in-flight requests fail fast with an explicit error, Serve
replaces the whole gang (new placement group, new ranks), and nothing leaks. (The HTTP API itself is tested against
a scripted gang in tests/serve/.)"""

import glob
import json
import os
import signal
import threading
import time
import uuid

import psutil
import pytest
import requests
import torch

from tests.conftest import URL, serve_app

MODEL = "raytp-tiny-llama"


@pytest.fixture(scope="module")
def app(ray_session):
    from ray import serve

    # step_timeout_s bounds how long a hung rank (SIGSTOP) can hold the gang
    with serve_app({"model": MODEL, "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32",
                    "step_timeout_s": 4}):
        yield serve.get_deployment_handle("LLMServer", app_name="raytp")


def test_health_reports_the_loaded_ranks(app):
    body = requests.get(URL + "/health", timeout=30).json()
    assert body["status"] == "ok" and body["tensor_parallel_size"] == 2
    assert (body["device"], body["dtype"]) == ("cpu", "float32")
    assert [rank["rank"] for rank in body["ranks"]] == [0, 1]
    assert all(rank["num_params"] > 0 and rank["load_s"] > 0 for rank in body["ranks"])
    assert body["num_finished"] == {}, "the warm-up generation is not counted"


def test_http_answer_is_the_models_greedy_output(app, tiny_model_path):
    from transformers import AutoModelForCausalLM

    from raytp.compat import dtype_kwarg

    prompt = [11, 42, 7, 300, 5]
    r = requests.post(URL + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True})
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, **dtype_kwarg(torch.float32)).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(tiny_model_path).decode(out[0, len(prompt):], skip_special_tokens=True,
                                                                   clean_up_tokenization_spaces=False)
    assert text == expected


def test_request_id_reaches_every_rank_and_prompts_stay_out_of_logs(app, ray_session):
    rid = f"obs-{uuid.uuid4().hex[:12]}"
    secret = "zebra quartz marmalade"
    r = requests.post(URL + "/v1/completions", headers={"X-Request-Id": rid}, timeout=60,
                      json={"model": MODEL, "prompt": secret, "max_tokens": 4})
    assert r.status_code == 200
    assert r.headers.get("x-request-id") == rid and r.json()["id"] == f"cmpl-{rid}"

    logs = os.path.join(ray_session._private.worker._global_node.get_session_dir_path(), "logs")
    deadline = time.monotonic() + 30
    while True:
        rank_lines, server_hits, leaks = [], 0, []
        for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
            if not os.path.isfile(path):
                continue
            with open(path, errors="replace") as f:
                text = f.read()
            if secret in text:
                leaks.append(path)
            if rid not in text:
                continue
            server_hits += "replica_" in os.path.basename(path) and "LLMServer" in path
            for line in text.splitlines():
                if rid in line and line.startswith("{"):
                    rank_lines.append(json.loads(line))
        if server_hits and {e.get("rank") for e in rank_lines} >= {0, 1}:
            break
        assert time.monotonic() < deadline, (server_hits, rank_lines)
        time.sleep(1)
    assert not leaks, f"prompt text logged in {leaks}"
    for entry in rank_lines:
        assert entry["request_id"] == f"cmpl-{rid}" and entry["level"] == "INFO" and entry["world_size"] == 2
        assert "prefill" in entry["message"]


def stream(results, i, first_chunk):
    body = {"model": MODEL, "prompt": f"the model {i}", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    events = []
    with requests.post(URL + "/v1/completions", json=body, stream=True, timeout=60) as r:
        if r.status_code != 200:  # failed before its first chunk (it was still queued): a plain 503
            results[i] = (r.status_code, r.json()["error"])
            return
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(line[6:])
                first_chunk.set()
    assert events[-1] == "[DONE]"
    results[i] = (200, json.loads(events[-2])["error"])


def live_placement_groups() -> list[str]:
    from ray.util import placement_group_table

    return sorted(pid for pid, pg in placement_group_table().items() if pg["state"] != "REMOVED")


def break_rank_and_recover(app, sig: int, fail_within_s: float) -> float:
    """Stream 3 requests, send ``sig`` to rank 1, check every request ends with the gang error in time and
    that Serve replaces the replica's gang and placement group; return the time to recovery."""
    old_pids = app.worker_pids.remote().result()
    old_pgs = live_placement_groups()
    assert len(old_pids) == 2 and len(old_pgs) == 1
    results, first = {}, threading.Event()
    threads = [threading.Thread(target=stream, args=(results, i, first)) for i in range(3)]
    for t in threads:
        t.start()
    assert first.wait(30)
    broken_at = time.monotonic()
    os.kill(old_pids[1], sig)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a request hung after a rank failed"
    assert time.monotonic() - broken_at < fail_within_s
    assert len(results) == 3
    for status, error in results.values():
        assert status in (200, 503)  # 200: an SSE error event after some chunks, then [DONE]
        assert error["type"] == "service_unavailable" and "gang is dead" in error["message"]

    # Serve notices the failed health check and starts a fresh replica: new placement group, new gang.
    deadline, recovered_in = time.monotonic() + 150, None
    while time.monotonic() < deadline:
        try:
            if requests.get(URL + "/health", timeout=10).status_code == 200:
                recovered_in = time.monotonic() - broken_at
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    assert recovered_in is not None, "replica was not replaced"
    new_pids = app.worker_pids.remote().result()
    assert not set(new_pids) & set(old_pids)
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) for p in old_pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(psutil.pid_exists(p) for p in old_pids), "old ranks leaked"
    new_pgs = live_placement_groups()
    assert len(new_pgs) == 1 and new_pgs != old_pgs, "the old placement group leaked"
    assert glob.glob("/dev/shm/deepspeed_allreduce_buffer_*") == [], "a killed gang leaves no shm buffer behind"
    r = requests.post(URL + "/v1/completions", json={"model": MODEL, "prompt": "again", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
    return recovered_in


def test_killed_rank_fails_requests_fast_and_gang_is_replaced(app):
    print(f"SIGKILL: recovered in {break_rank_and_recover(app, signal.SIGKILL, 10):.1f}s")


def test_hung_rank_is_caught_by_the_step_timeout(app):
    # A stopped rank never answers; the gang's step timeout (4 s here) declares it dead.
    print(f"SIGSTOP: recovered in {break_rank_and_recover(app, signal.SIGSTOP, 4 + 6):.1f}s")
