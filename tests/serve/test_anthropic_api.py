"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) through the official ``anthropic`` SDK,
over the real ingress, server and engine (a scripted gang): plain and streamed messages, system prompts, stop
sequences, a forced tool call and its result sent back, token counts, the API key as ``x-api-key``, and errors
in Anthropic's shape. The scripted gang never emits EOS, so an answer ends at max_tokens, a stop sequence or a
tool call's closed JSON."""

import json

import pytest
import requests

from raytp.testing import scripted_engine_factory
from tests.conftest import URL, serve_app
from tests.serve.conftest import ARGS, MODEL

anthropic = pytest.importorskip("anthropic")
KEY = "anthropic-test-key"
HI = [{"role": "user", "content": "hi"}]
WEATHER = {"name": "get_weather", "description": "weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"enum": ["paris", "rome"]}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}
RAW_EVENTS = {"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
              "message_stop"}


@pytest.fixture(scope="module")
def app(ray_session):
    """The serve tests' scripted TP=2 app, with an API key (Anthropic's clients send it as x-api-key)."""
    with serve_app({**ARGS, "api_key": KEY}, engine_factory=scripted_engine_factory(step_delay_s=0.002)) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(app):
    return anthropic.Anthropic(base_url=URL, api_key=KEY, max_retries=0)


GREEDY = {"temperature": 0}  # the SDK (2.x) has no sampling arguments any more; the API still takes them


def create(client, **body):
    return client.messages.create(**{"model": MODEL, "max_tokens": 6, "extra_body": GREEDY, "messages": HI, **body})


def post(path, body, headers=None):
    return requests.post(URL + path, json=body, headers={"x-api-key": KEY} if headers is None else headers,
                         timeout=60)


def error_of(r, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    return body["error"]["message"]


def test_a_plain_message_is_the_chat_answer(client):
    msg = create(client)
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_") and msg.model == MODEL
    (block,) = msg.content
    assert block.type == "text" and block.text
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None  # the scripted gang never emits EOS
    assert msg.usage.output_tokens == 6 and msg.usage.input_tokens > 0
    chat = requests.post(URL + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                         json={"model": MODEL, "max_tokens": 6, "temperature": 0, "messages": HI}).json()
    assert block.text == chat["choices"][0]["message"]["content"]
    assert msg.usage.input_tokens == chat["usage"]["prompt_tokens"]


def test_system_as_a_string_or_as_text_blocks(client):
    plain = create(client)
    as_string = create(client, system="answer briefly")
    as_blocks = create(client, system=[{"type": "text", "text": "answer "}, {"type": "text", "text": "briefly"}])
    assert as_string.content[0].text == as_blocks.content[0].text
    assert as_string.usage.input_tokens == as_blocks.usage.input_tokens > plain.usage.input_tokens


def test_stop_sequences_end_the_answer_and_are_named(client):
    text = create(client, max_tokens=12).content[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    at = text.find(stop)  # the engine stops at the first match
    msg = create(client, max_tokens=12, stop_sequences=["never-generated", stop])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == text[:at] and msg.usage.output_tokens < 12
    with client.messages.stream(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=HI,
                                stop_sequences=[stop]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text[:at] and final.stop_sequence == stop and final.stop_reason == "stop_sequence"


def test_a_stream_sends_anthropics_events_in_order(client):
    whole = create(client)
    with client.messages.stream(model=MODEL, max_tokens=6, extra_body=GREEDY, messages=HI) as stream:
        events = [e for e in stream if e.type in RAW_EVENTS]
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert all(e.index == 0 and e.delta.type == "text_delta" for e in events[2:-3])
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6 and final.id.startswith("msg_")


def test_sse_lines_name_each_event(app):
    r = requests.post(URL + "/v1/messages", headers={"x-api-key": KEY}, stream=True, timeout=60,
                      json={"model": MODEL, "max_tokens": 3, "messages": HI, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = r.text.strip().split("\n\n")
    for frame in frames:
        event, data = frame.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == event[7:]
    assert frames[-1].startswith("event: message_stop")


def test_a_forced_tool_call_and_its_result_sent_back(client):
    tool_choice = {"type": "tool", "name": "get_weather"}
    ask = [{"role": "user", "content": "weather in paris?"}]
    msg = create(client, messages=ask, max_tokens=64, tools=[WEATHER], tool_choice=tool_choice)
    assert msg.stop_reason == "tool_use"
    (call,) = [b for b in msg.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id
    assert set(call.input) == {"city", "unit"} and call.input["city"] in ("paris", "rome")
    assert call.input["unit"] in ("c", "f")
    # streamed: the same call, its input as input_json_delta
    with client.messages.stream(model=MODEL, max_tokens=64, extra_body=GREEDY, messages=ask, tools=[WEATHER],
                                tool_choice=tool_choice) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "input_json_delta" in deltas and final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", "get_weather", call.input)]
    # the result goes back as a tool_result block; the answer is text
    turns = ask + [{"role": "assistant", "content": msg.content},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                 "content": [{"type": "text", "text": "21 degrees"}]}]}]
    answer = create(client, messages=turns, tools=[WEATHER], tool_choice={"type": "none"})
    assert answer.stop_reason == "max_tokens" and answer.content[0].type == "text" and answer.content[0].text
    assert answer.usage.input_tokens > msg.usage.input_tokens


def test_any_tool_is_a_call_to_one_of_them(client):
    # one call at most (OpenAI's parallel_tool_calls false): the scripted gang would go on adding calls otherwise
    msg = create(client, max_tokens=64, tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert msg.stop_reason == "tool_use" and [b.name for b in msg.content if b.type == "tool_use"] == ["get_weather"]


def test_a_final_assistant_turn_is_continued(client):
    turns = HI + [{"role": "assistant", "content": "The answer is"}]
    msg = create(client, messages=turns)
    chat = requests.post(URL + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, json={
        "model": MODEL, "max_tokens": 6, "temperature": 0, "messages": turns, "add_generation_prompt": False,
        "continue_final_message": True}).json()
    assert msg.content[0].text == chat["choices"][0]["message"]["content"]


def test_count_tokens_is_the_prompt_a_message_sends(client):
    system = "answer briefly"
    counted = client.messages.count_tokens(model=MODEL, messages=HI, system=system)
    assert counted.input_tokens == create(client, system=system).usage.input_tokens
    with_tools = client.messages.count_tokens(model=MODEL, messages=HI, tools=[WEATHER])
    sent = create(client, tools=[WEATHER], tool_choice={"type": "none"})
    assert with_tools.input_tokens == sent.usage.input_tokens
    tokenized = post("/tokenize", {"messages": HI}).json()["count"]
    assert client.messages.count_tokens(model=MODEL, messages=HI).input_tokens == tokenized


def test_the_api_key_as_x_api_key_or_bearer(client):
    body = {"model": MODEL, "max_tokens": 2, "messages": HI}
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}, {"x-api-key": "kéy"}):
        assert "API key" in error_of(post("/v1/messages", body, headers), 401, "authentication_error")
    error_of(post("/v1/messages/count_tokens", {"model": MODEL, "messages": HI}, {}), 401, "authentication_error")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=URL, api_key="wrong", max_retries=0).messages.create(**body)
    assert post("/v1/messages", body, {"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert requests.get(URL + "/v1/models", headers={"x-api-key": KEY}, timeout=30).status_code == 200
    assert requests.get(URL + "/v1/models", timeout=30).json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("body,kind,status", [
    ({"model": MODEL, "messages": HI}, "invalid_request_error", 400),  # max_tokens is required
    ({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "invalid_request_error", 400),
    ({"model": MODEL, "max_tokens": 2, "messages": HI, "tool_choice": {"type": "tool", "name": "nope"},
      "tools": [WEATHER]}, "invalid_request_error", 400),
    ({"model": MODEL, "max_tokens": 2, "messages": HI, "tools": [WEATHER]}, "invalid_request_error", 400),  # auto
    ({"model": MODEL, "max_tokens": 10**6, "messages": HI}, "invalid_request_error", 400),  # past max_model_len
    ({"model": "not-served", "max_tokens": 2, "messages": HI}, "not_found_error", 404),
    ({"model": "not-served", "max_tokens": 2, "messages": HI, "stream": True}, "not_found_error", 404),
])
def test_errors_in_anthropics_shape(app, body, kind, status):
    error_of(post("/v1/messages", body), status, kind)


def test_malformed_bodies_are_400s_in_anthropics_shape(client):
    r = requests.post(URL + "/v1/messages", data=b"{not json", timeout=30,
                      headers={"x-api-key": KEY, "content-type": "application/json"})
    error_of(r, 400, "invalid_request_error")
    error_of(post("/v1/messages/count_tokens", {"model": MODEL}), 400, "invalid_request_error")
    error_of(post("/v1/messages", ["a list"]), 400, "invalid_request_error")
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="not-served", max_tokens=2, messages=HI)
    assert e.value.body["error"]["type"] == "not_found_error"
    # the OpenAI routes keep their own shape
    assert set(post("/v1/chat/completions", {"model": MODEL}).json()) == {"error"}
