"""A real TP=2 gang behind the real Serve app: the HTTP answer is the model's own greedy output, /health shows the
loaded ranks, and the request id reaches every rank's log while the prompt never does. (The HTTP API itself is
tested against a scripted gang in tests/serve/.)"""

import glob
import json
import os
import time
import uuid

import requests
import torch

from tests.conftest import URL

MODEL = "raytp-tiny-llama"


def test_health_reports_the_loaded_ranks(tp2_app):
    body = requests.get(URL + "/health", timeout=30).json()
    assert body["status"] == "ok" and body["tensor_parallel_size"] == 2
    assert (body["device"], body["dtype"]) == ("cpu", "float32")
    assert [rank["rank"] for rank in body["ranks"]] == [0, 1]
    assert all(rank["num_params"] > 0 and rank["load_s"] > 0 for rank in body["ranks"])
    assert body["num_finished"] == {}, "the warm-up generation is not counted"


def test_http_answer_is_the_models_greedy_output(tp2_app, tiny_model_path):
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


def test_request_id_reaches_every_rank_and_prompts_stay_out_of_logs(tp2_app, ray_session):
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
