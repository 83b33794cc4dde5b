"""The OpenAI HTTP API and the Python handles of a real Serve app (ingress + server with a placement group of 2
bundles + engine) over a scripted gang: framing, usage, stop strings, seeds, errors, limits, concurrency."""

import json

import pytest
import requests

from tests.conftest import URL
from tests.serve.conftest import MODEL


def post(path, body, **kw):
    return requests.post(URL + path, json=body, timeout=60, **kw)


def sse_events(resp):
    events = [line[len("data: "):] for line in resp.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_reports_loaded_gang(app):
    r = requests.get(URL + "/health", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["tensor_parallel_size"] == 2
    assert [rank["rank"] for rank in body["ranks"]] == [0, 1]



def test_version_and_ping_as_vllm_serves_them(app):
    import raytp

    version = requests.get(URL + "/version", timeout=30)
    assert version.status_code == 200 and version.json() == {"version": raytp.__version__}
    for method in ("GET", "POST"):  # SageMaker's probe: /health's answer
        ping = requests.request(method, URL + "/ping", timeout=30)
        assert ping.status_code == 200 and ping.json()["status"] == "ok", ping.text


def test_invocations_route_by_the_body_as_sagemaker_asks(app):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    text = {"model": MODEL, "prompt": "the model", "max_tokens": 5, "temperature": 0}
    for body, path, obj in ((chat, "/v1/chat/completions", "chat.completion"),
                            (text, "/v1/completions", "text_completion")):
        r = post("/invocations", body)
        assert r.status_code == 200 and r.json()["object"] == obj, r.text
        direct = post(path, body).json()
        assert r.json()["choices"] == direct["choices"] and r.json()["usage"] == direct["usage"]
        stream = post("/invocations", {**body, "stream": True}, stream=True)
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(stream)
        assert {c["object"] for c in chunks} == {obj + ".chunk" if obj == "chat.completion" else obj}
        said = "".join(c["choices"][0]["delta"].get("content") or "" if "delta" in c["choices"][0] else
                       c["choices"][0]["text"] for c in chunks)
        first = direct["choices"][0]
        assert said == (first["message"]["content"] if "message" in first else first["text"])
    for bad, param in (({"model": MODEL, "input": "x"}, None), ([1, 2], None),
                       ({**chat, "temperature": -1}, "temperature"), ({**text, "max_tokens": 0}, "max_tokens")):
        r = post("/invocations", bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = requests.post(URL + "/invocations", data="{not json", headers={"content-type": "application/json"},
                      timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_invalid"

def test_placement_group_has_one_bundle_per_rank(app):
    from ray.util import placement_group_table

    created = [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]
    assert len(created) == 1
    assert len(created[0]["bundles"]) == 2 and created[0]["strategy"] == "STRICT_PACK"


def test_models_card(app):
    from raytp import tiny_model

    data = requests.get(URL + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in data] == [MODEL]
    assert data[0]["root"] == tiny_model.ensure(MODEL)


def test_completion_greedy_deterministic_with_usage(app, tiny_tokenizer):
    body = {"model": MODEL, "prompt": "the model serves", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    a, b = post("/v1/completions", body).json(), post("/v1/completions", body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"] != ""
    assert a["choices"][0]["finish_reason"] == "length"
    n_prompt = len(tiny_tokenizer.encode("the model serves"))
    assert a["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12}


def test_stop_string_is_cut(app):
    body = {"model": MODEL, "prompt": "the model serves", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    full = post("/v1/completions", body).json()["choices"][0]["text"]
    stop = full[5:8]
    cut = post("/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[:full.index(stop)]


def test_seeded_sampling_reproducible(app):
    body = {"model": MODEL, "prompt": "the gang", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "top_k": 50,
            "seed": 42}
    text = post("/v1/completions", body).json()["choices"][0]["text"]
    assert post("/v1/completions", body).json()["choices"][0]["text"] == text
    assert post("/v1/completions", {**body, "seed": 43}).json()["choices"][0]["text"] != text


def test_chat_completion(app):
    r = post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 8


def test_streaming_equals_non_streaming(app):
    body = {"model": MODEL, "prompt": "requests arrive", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    full = post("/v1/completions", body).json()
    r = post("/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}, stream=True)
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r)
    text_chunks, usage = chunks[:-1], chunks[-1]["usage"]
    assert len(text_chunks) == usage["completion_tokens"] == 16, "one event per generated token"
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == full["choices"][0]["text"]
    assert usage == full["usage"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_streaming_with_usage(app):
    r = post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hello"}],
                                      "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
                                      "stream_options": {"include_usage": True}}, stream=True)
    chunks = sse_events(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "the " * 300, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "the " * 300}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", ""]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"99999": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages.0.content"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, None),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 10**12]}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(app, path, body, status, param):
    for stream in (False, True):
        r = post(path, {**body, "stream": stream} if isinstance(body, dict) else body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and "type" in err and "code" in err
    ok = post("/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2})
    assert ok.status_code == 200


def test_invalid_json_and_unknown_route(app):
    r = requests.post(URL + "/v1/completions", data="{not json", headers={"content-type": "application/json"},
                      timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.post(URL + "/v1/completions", data=b'{"model": "raytp-tiny-llama", "prompt": "\xff\xfe"}',
                      headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"  # invalid UTF-8
    r = requests.get(URL + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def test_openai_client(app):
    import openai

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    c = client.completions.create(model=MODEL, prompt="the model", max_tokens=5, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.completion_tokens <= 5
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            temperature=0, stream=True)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert streamed == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)


def test_handle_generate_and_stream(app):
    from raytp.errors import InvalidRequestError

    text = app.generate.remote("the model serves", max_tokens=10, temperature=0, ignore_eos=True).result()
    deltas = list(app.options(stream=True).generate_stream.remote("the model serves", max_tokens=10, temperature=0,
                                                                  ignore_eos=True))
    assert text and "".join(deltas) == text
    body = app.completions.remote({"model": MODEL, "prompt": "the model serves", "max_tokens": 10, "temperature": 0,
                                   "ignore_eos": True}).result()
    assert body["choices"][0]["text"] == text
    with pytest.raises(InvalidRequestError):
        app.generate.remote("x", max_tokens=0).result()


def test_handle_streams_and_the_messages_and_responses_apis(app):
    """Every route has its handle method: streamed completions and chats (OpenAI chunks), Anthropic's messages and
    token count, OpenAI's Responses API; each answers what its HTTP route answers, and a bad body raises."""
    from raytp.errors import InvalidRequestError

    body = {"model": MODEL, "prompt": "the model serves", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    whole = app.completions.remote(body).result()["choices"][0]["text"]
    chunks = list(app.options(stream=True).completions_stream.remote({**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    said = app.chat_completions.remote(chat).result()["choices"][0]["message"]["content"]
    chunks = list(app.options(stream=True).chat_completions_stream.remote({**chat, "stream": True}))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == said
    message = app.messages.remote({"model": MODEL, "max_tokens": 6, "temperature": 0,
                                   "messages": [{"role": "user", "content": "hi"}]}).result()
    assert message["type"] == "message" and message["content"][0]["text"] == said
    assert message == post("/v1/messages", {"model": MODEL, "max_tokens": 6, "temperature": 0, "messages": [
        {"role": "user", "content": "hi"}]}).json() | {"id": message["id"]}
    counted = app.count_tokens.remote({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).result()
    assert counted == post("/v1/messages/count_tokens", {"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}]}).json() and counted["input_tokens"] > 0
    response = app.responses.remote({"model": MODEL, "input": "hi", "max_output_tokens": 6, "temperature": 0,
                                     "store": False}).result()
    assert response["object"] == "response" and response["output"][0]["content"][0]["text"] == said
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        app.messages.remote({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).result()
    with pytest.raises(InvalidRequestError):
        app.responses.remote({"model": MODEL}).result()


def test_concurrent_requests_do_not_interleave(app):
    """Concurrent greedy requests (batched together) each get what they get alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["the model", "requests arrive stream", "cpu xpu and cuda", "the gang keeps every shard", "finish"]
    alone = [post("/v1/completions", {"model": MODEL, "prompt": p, "max_tokens": 10, "temperature": 0,
                                      "ignore_eos": True}).json()["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(len(prompts) * 2) as pool:
        together = list(pool.map(lambda p: post("/v1/completions", {
            "model": MODEL, "prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
        }).json()["choices"][0]["text"], prompts * 2))
    assert together == alone * 2


def test_oversized_bodies_get_413_and_the_server_keeps_answering(app):
    big = "x" * (1_048_576 + 10)
    r = post("/v1/completions", {"model": MODEL, "prompt": big, "max_tokens": 2})
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(40):
            yield b"y" * 32768
        yield b'", "max_tokens": 2}'

    r = requests.post(URL + "/v1/completions", data=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert post("/v1/completions", {"model": MODEL, "prompt": "small", "max_tokens": 2}).status_code == 200


def test_client_errors_are_logged_as_one_info_line(app, ray_session):
    """Serve logs an exception raised in a replica as ERROR with a traceback; a 4xx is the client's error, so the
    replicas log it as one INFO line instead."""
    import glob
    import os
    import time

    r = post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10_000})
    assert r.status_code == 400
    replica = requests.get(URL + "/health", timeout=30).json()["replica_id"]
    logs = os.path.join(ray_session._private.worker._global_node.get_session_dir_path(), "logs", "serve")
    deadline = time.monotonic() + 20
    while True:
        lines = [line for path in glob.glob(os.path.join(logs, f"replica_raytp_LLMServer_{replica}*.log"))
                 for line in open(path, errors="replace")]
        info = [line for line in lines if "Request failed: InvalidRequestError (400)" in line]
        if info or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert info and all(line.split()[0] == "INFO" for line in info), info
    assert not [line for line in lines if "ERROR" in line and "Request failed" in line]
    assert not [line for line in lines if "Traceback" in line]


@pytest.mark.parametrize("model", [None, ""])
def test_a_request_without_model_is_answered_by_the_served_model(app, model):
    """vLLM's behaviour: an absent or empty ``model`` means the one served model, named in the answer."""
    base = {"prompt": "requests arrive", "max_tokens": 3, "temperature": 0}
    body = base if model is None else {**base, "model": model}
    r = post("/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL
    assert r.json()["choices"][0]["text"] == post("/v1/completions", {**base, "model": MODEL}).json()["choices"][0][
        "text"]
    chunks = sse_events(post("/v1/completions", {**body, "stream": True}, stream=True))
    assert chunks and all(c["model"] == MODEL for c in chunks)
