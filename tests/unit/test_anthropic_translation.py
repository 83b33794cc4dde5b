"""raytp.api.anthropic's pure translations: an Anthropic request as the chat request that answers it, and chat
answers / stream chunks as Anthropic's message body and events (no Ray, no model)."""

import pytest

from raytp.api import anthropic as a
from raytp.errors import InvalidRequestError, ModelLoadingError, ModelNotFoundError, QueueFullError


def request(**body):
    return a.MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": "hi"}], **body})


def test_tool_turns_become_tool_calls_and_tool_messages():
    req = request(system=[{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "text", "text": "checking"},
                                          {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "rome"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "21"},
                                     {"type": "text", "text": "and now?"}]}],
        tools=[{"name": "w", "input_schema": {"type": "object"}}], tool_choice={"type": "any"},
        metadata={"user_id": "u"})
    chat = a.chat_request(req)
    assert [(m.role, m.text) for m in chat.messages] == [
        ("system", "be brief"), ("user", "weather?"), ("assistant", "checking"), ("tool", "21"), ("user", "and now?")]
    (call,) = chat.messages[2].tool_calls
    assert (call.id, call.function.name, call.function.arguments) == ("t1", "w", '{"city": "rome"}')
    assert chat.messages[3].tool_call_id == "t1"
    assert chat.tool_choice == "required" and chat.tools[0].function.name == "w" and chat.add_generation_prompt


@pytest.mark.parametrize("choice,expected", [({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
                                             ({"type": "tool", "name": "w"}, "w")])
def test_tool_choice(choice, expected):
    chat = a.chat_request(request(tools=[{"name": "w", "input_schema": {}}], tool_choice=choice))
    assert (chat.tool_choice if isinstance(chat.tool_choice, str) else chat.tool_choice.function.name) == expected


def test_sampling_stops_and_a_prefill():
    chat = a.chat_request(request(temperature=0, top_k=3, stop_sequences=["\n\n"], stream=True, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure:"}]))
    assert (chat.temperature, chat.top_k, chat.stop, chat.include_stop_str_in_output) == (0, 3, ["\n\n"], True)
    assert chat.continue_final_message and not chat.add_generation_prompt
    assert chat.stream_options.include_usage and chat.stream_options.continuous_usage_stats


@pytest.mark.parametrize("body", [
    {"max_tokens": None}, {"max_tokens": 0}, {"temperature": 3}, {"stop_sequences": list("abcde")},
    {"tool_choice": {"type": "tool"}}, {"tool_choice": {"type": "any"}},
    {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "1", "name": "w", "input": {}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "document"}]}]}, {"messages": []},
])
def test_invalid_requests(body):
    from raytp.api.openai import parse

    with pytest.raises(InvalidRequestError):
        parse(a.MessagesRequest, {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}],
                                  **body})


def chat_body(content, finish="length", calls=None):
    return {"id": "chatcmpl-abc", "model": "m", "usage": {"prompt_tokens": 5, "completion_tokens": 3},
            "choices": [{"finish_reason": finish, "message": {"content": content, "tool_calls": calls}}]}


def test_message_body():
    body = a.message_body(chat_body("hello world"), None)
    assert body["id"] == "msg_abc" and body["content"] == [{"type": "text", "text": "hello world"}]
    assert (body["stop_reason"], body["stop_sequence"], body["usage"]) == (
        "max_tokens", None, {"input_tokens": 5, "output_tokens": 3})
    stopped = a.message_body(chat_body("hello END", "stop"), ["D", "END"])
    assert stopped["content"][0]["text"] == "hello " and stopped["stop_sequence"] == "END"
    assert stopped["stop_reason"] == "stop_sequence"
    assert a.message_body(chat_body("", "stop"), None)["content"] == [{"type": "text", "text": ""}]
    call = {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"a": 1}'}}
    tool = a.message_body(chat_body(None, "tool_calls", [call]), None)
    assert tool["stop_reason"] == "tool_use"
    assert tool["content"] == [{"type": "tool_use", "id": "call_1", "name": "w", "input": {"a": 1}}]


def chunk(content=None, finish=None, calls=None, done=False):
    choices = [] if done else [{"delta": {"content": content, **({"tool_calls": calls} if calls else {})},
                                "finish_reason": finish}]
    return {"id": "chatcmpl-abc", "model": "m", "choices": choices,
            "usage": {"prompt_tokens": 5, "completion_tokens": 2}}


def events(stream, chunks):
    return [e for c in chunks for e in stream.feed(c)] + stream.finish()


def test_a_stop_sequence_split_across_chunks_is_held_back_and_dropped():
    out = events(a.MessageStream("m", ["STOP"]), [chunk("ab S"), chunk("T"), chunk("xST"), chunk("OP", "stop"),
                                                  chunk(done=True)])
    assert [e["type"] for e in out] == ["message_start", "content_block_start"] + ["content_block_delta"] * 2 + [
        "content_block_stop", "message_delta", "message_stop"]
    assert "".join(e["delta"]["text"] for e in out if e["type"] == "content_block_delta") == "ab STx"
    assert out[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}
    assert out[-2]["usage"] == {"input_tokens": 5, "output_tokens": 2} and out[0]["message"]["id"] == "msg_abc"


def test_held_back_text_that_was_no_stop_sequence_is_sent_at_the_end():
    out = events(a.MessageStream("m", ["STOP"]), [chunk("ab ST", "length")])
    assert "".join(e["delta"]["text"] for e in out if e["type"] == "content_block_delta") == "ab ST"
    assert out[-2]["delta"]["stop_reason"] == "max_tokens"


def test_a_streamed_tool_call_is_a_tool_use_block():
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"a": 1}'}}
    out = events(a.MessageStream("m", None), [chunk("let me check"), chunk(calls=[call]), chunk(finish="tool_calls")])
    starts = [e["content_block"] for e in out if e["type"] == "content_block_start"]
    assert starts == [{"type": "text", "text": ""}, {"type": "tool_use", "id": "call_1", "name": "w", "input": {}}]
    assert [e["index"] for e in out if e["type"] == "content_block_stop"] == [0, 1]
    assert {"type": "input_json_delta", "partial_json": '{"a": 1}'} in [e.get("delta") for e in out]
    assert out[-2]["delta"]["stop_reason"] == "tool_use"


def test_an_empty_answer_is_one_empty_text_block():
    out = events(a.MessageStream("m", None), [chunk("", "stop")])
    assert [e["type"] for e in out] == ["message_start", "content_block_start", "content_block_stop",
                                        "message_delta", "message_stop"]


@pytest.mark.parametrize("err,kind", [(InvalidRequestError("x"), "invalid_request_error"),
                                      (ModelNotFoundError("x"), "not_found_error"),
                                      (QueueFullError("x"), "rate_limit_error"),
                                      (ModelLoadingError("x"), "overloaded_error")])
def test_error_types(err, kind):
    assert a.error_body(err) == {"type": "error", "error": {"type": kind, "message": "x"}}


def test_the_routes_by_path():
    assert a.is_messages_path("/v1/messages") and a.is_messages_path("/prefix/v1/messages/count_tokens")
    assert not a.is_messages_path("/v1/chat/completions") and not a.is_messages_path("")
