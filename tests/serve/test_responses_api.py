"""OpenAI's Responses API over HTTP, through the official openai SDK, the real ingress, server and engine (a
scripted gang): string and item input, instructions, max_output_tokens (incomplete), the store (retrieve,
previous_response_id, 404s naming the id), cancel as vLLM answers it, the streamed event sequence, text.format,
and a two-turn function-call loop. The scripted gang never emits EOS, so a plain text answer always ends at its
token limit (incomplete); constrained outputs (a closed JSON schema, a forced call) end on their own."""

import json

import openai
import pytest
import requests

from tests.conftest import URL
from tests.serve.conftest import MODEL

WEATHER = {"type": "function", "name": "get_weather", "description": "weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["paris", "rome"]}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
          "required": ["ok", "color"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=URL + "/v1", api_key="unused")


def chat(messages, **body) -> dict:
    r = requests.post(URL + "/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0,
                                                          **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_string_input_cut_by_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=6, temperature=0, metadata={"k": "v"})
    said = chat([{"role": "user", "content": "hi"}], max_tokens=6)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.output_text == said["choices"][0]["message"]["content"]
    assert (r.usage.input_tokens, r.usage.output_tokens) == (said["usage"]["prompt_tokens"], 6)
    assert r.usage.total_tokens == r.usage.input_tokens + 6
    # the request's settings, echoed
    assert (r.max_output_tokens, r.temperature, r.top_p, r.metadata, r.tool_choice) == (6, 0, 1.0, {"k": "v"}, "auto")


def test_item_input_with_instructions_is_the_chat_it_stands_for(client):
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi there"}]},
             {"role": "user", "content": "how are you?"}]
    r = client.responses.create(model=MODEL, input=items, instructions="be brief", max_output_tokens=5,
                                temperature=0)
    said = chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                 {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "how are you?"}],
                max_tokens=5)
    assert r.output_text == said["choices"][0]["message"]["content"] and r.instructions == "be brief"
    assert r.usage.input_tokens == said["usage"]["prompt_tokens"]


def test_stored_responses_are_retrieved_and_chained(client):
    first = client.responses.create(model=MODEL, input="hi", max_output_tokens=4, temperature=0)
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = client.responses.create(model=MODEL, input="and then?", previous_response_id=first.id,
                                     max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "and then?"}]
    said = chat(history, max_tokens=4)
    assert second.usage.input_tokens == said["usage"]["prompt_tokens"] > first.usage.input_tokens + 4
    assert second.output_text == said["choices"][0]["message"]["content"]
    third = client.responses.create(model=MODEL, input="more", previous_response_id=second.id, max_output_tokens=2)
    assert third.usage.input_tokens > second.usage.input_tokens + 4  # the whole conversation, not one turn back


def test_unknown_ids_are_404_naming_the_id(client):
    unstored = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    for missing in (unstored.id, "resp_nope"):
        with pytest.raises(openai.NotFoundError, match=missing):
            client.responses.retrieve(missing)
        with pytest.raises(openai.NotFoundError, match=missing) as e:
            client.responses.create(model=MODEL, input="x", previous_response_id=missing, max_output_tokens=2)
        assert e.value.body["param"] == "previous_response_id"


def test_cancel_answers_as_vllm_for_synchronous_responses(client):
    stored = client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        client.responses.cancel(stored.id)
    with pytest.raises(openai.NotFoundError, match="resp_unknown"):
        client.responses.cancel("resp_unknown")


def test_a_stream_sends_the_responses_event_sequence(client):
    whole = client.responses.create(model=MODEL, input="hi", max_output_tokens=6, temperature=0)
    with client.responses.stream(model=MODEL, input="hi", max_output_tokens=6, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * len(deltas)
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert 1 <= len(deltas) <= 6 and [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.status == "incomplete" and final.usage.output_tokens == 6
    assert client.responses.retrieve(final.id).output_text == whole.output_text  # a stream is stored too
    # the wire: "event: <type>" before each data line, and no [DONE]
    r = requests.post(URL + "/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 3,
                                                   "stream": True}, stream=True, timeout=60)
    lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    pairs = list(zip(lines[::2], lines[1::2]))
    assert len(lines) % 2 == 0 and all(e == "event: " + json.loads(d[6:])["type"] for e, d in pairs)
    assert pairs[-1][0] == "event: response.completed"


def test_a_disconnected_stream_is_aborted(app):
    """As on /v1/chat/completions: a client that goes away mid-stream aborts its request in the engine."""
    import time

    def finished():
        return requests.get(URL + "/health", timeout=10).json()["num_finished"]

    before = finished()
    r = requests.post(URL + "/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 200,
                                                   "stream": True}, stream=True, timeout=60)
    next(r.iter_lines())  # the first event arrived: the request is running
    r.close()
    deadline = time.monotonic() + 10
    while finished().get("abort", 0) == before.get("abort", 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = finished()
    assert after.get("abort", 0) == before.get("abort", 0) + 1
    assert after.get("length", 0) == before.get("length", 0), "cut short, not run to max_output_tokens"


def test_text_format_json_schema_output_parses(client):
    r = client.responses.create(model=MODEL, input="pick", max_output_tokens=64, text={"format": {
        "type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}})
    assert r.status == "completed" and set(json.loads(r.output_text)) == {"ok", "color"}
    assert r.text.format.type == "json_schema"


def test_a_two_turn_function_call_loop(client):
    first = client.responses.create(model=MODEL, input="weather in rome?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=64)
    (call,) = first.output
    assert first.status == "completed" and call.type == "function_call" and call.name == "get_weather"
    assert call.status == "completed" and call.id.startswith("fc_") and call.call_id
    assert set(json.loads(call.arguments)) == {"city", "unit"}
    second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER], tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "21 degrees"}], max_output_tokens=4)
    assert [item.type for item in second.output] == ["message"] and second.output_text
    history = [{"role": "user", "content": "weather in rome?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function",
                                                                      "function": {"name": call.name,
                                                                                   "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": "21 degrees"}]
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    said = chat(history, tools=[chat_tool], tool_choice="none", max_tokens=4)
    assert second.usage.input_tokens == said["usage"]["prompt_tokens"] > first.usage.input_tokens
    # the same call, streamed: arguments delta and done, then the item
    with client.responses.stream(model=MODEL, input="weather in rome?", tools=[WEATHER], max_output_tokens=64,
                                 tool_choice={"type": "function", "name": "get_weather"}) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert types[2:] == ["response.output_item.added", "response.function_call_arguments.delta",
                         "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert set(json.loads(final.output[0].arguments)) == {"city", "unit"}


@pytest.mark.parametrize("body,param", [
    ({"input": 5}, None),
    ({"input": []}, "input"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, None),
    ({"input": [{"type": "function_call_output"}]}, None),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "tool_choice": "required"}, None),  # the chat path's rule: required needs tools
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, None),
])
def test_malformed_requests_are_400(app, body, param):
    r = requests.post(URL + "/v1/responses", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param, err
    bad = requests.post(URL + "/v1/responses", data=b"{not json", headers={"content-type": "application/json"},
                        timeout=60)
    assert bad.status_code == 400


def test_the_store_is_bounded_by_count_and_age():
    """No Serve needed: the ingress's store keeps at most max_entries responses, none older than max_age_s."""
    from raytp.serve.response_store import ResponseStore, StoredResponse

    now = [0.0]
    store = ResponseStore(max_entries=2, max_age_s=10.0, clock=lambda: now[0])
    for i in range(3):
        store.put(f"resp_{i}", StoredResponse({"id": f"resp_{i}"}, []))
        now[0] += 4.0
    assert store.get("resp_0") is None and len(store) == 2  # the oldest went first
    assert store.get("resp_1").response["id"] == "resp_1"
    now[0] = 14.5  # resp_1 was stored at 4.0: older than 10 s now; resp_2 (8.0) is not
    assert store.get("resp_1") is None and store.get("resp_2") is not None
