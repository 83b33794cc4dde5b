import pytest

from raytp.api.openai import parse
from raytp.api.protocol import ChatCompletionRequest, CompletionRequest
from raytp.errors import InvalidRequestError


def test_completion_defaults_follow_openai():
    r = parse(CompletionRequest, {"model": "m", "prompt": "hi"})
    assert r.max_tokens == 16 and r.temperature == 1.0 and r.stop == [] and r.n == 1
    assert parse(CompletionRequest, {"prompt": "hi"}).model is None  # the server answers with its model (vLLM's)


@pytest.mark.parametrize("body,param", [
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": "x", "n": 65}, "n"),
    ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "m", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "m", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": "m", "prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ({"model": "m", "prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"model": "m", "prompt": "x", "tools": []}, "tools"),
    ({"model": "m", "prompt": "x", "response_format": {"type": "yaml"}}, "response_format.type"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
])
def test_bad_completion_requests_name_the_param(body, param):
    with pytest.raises(InvalidRequestError) as e:
        parse(CompletionRequest, body)
    assert e.value.param == param and e.value.status_code == 400
    assert e.value.to_dict()["error"]["type"] == "invalid_request_error"


def test_supported_parameters_parse():
    r = parse(CompletionRequest, {"model": "m", "prompt": [[1, 2], [3]], "n": 3, "logprobs": 2, "presence_penalty": 1,
                                  "frequency_penalty": -1, "logit_bias": {"5": -100}, "min_tokens": 2,
                                  "stop_token_ids": [7], "repetition_penalty": 1.2, "user": "u", "best_of": 1,
                                  "stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert r.prompt == [[1, 2], [3]] and r.n == 3 and r.logit_bias == {"5": -100}
    chat = parse(ChatCompletionRequest, {"model": "m", "logprobs": True, "top_logprobs": 5, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert chat.num_logprobs == 5 and chat.messages[0].text == "ab"


def test_chat_requires_messages():
    with pytest.raises(InvalidRequestError) as e:
        parse(ChatCompletionRequest, {"model": "m", "messages": []})
    assert e.value.param == "messages"
    r = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                      "max_completion_tokens": 7})
    assert r.max_new_tokens == 7


def test_errors_survive_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(InvalidRequestError("bad", param="max_tokens", code="x")))
    assert (e.message, e.param, e.code, e.status_code) == ("bad", "max_tokens", "x", 400)


def test_hermes_tool_call_parser():
    from raytp.api.tools import parse_hermes

    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "rome"}}\n</tool_call>' \
           '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = parse_hermes(text)
    assert content == "Let me check." and calls == [("get_weather", '{"city": "rome"}'), ("get_time", "{}")]
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_hermes("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


def test_forced_tool_schema_is_vllms_shape():
    from raytp.api.protocol import ChatCompletionRequest
    from raytp.api.tools import forced_schema

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    req = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                        "tools": [tool], "tool_choice": "required", "parallel_tool_calls": False})
    schema = forced_schema(req.tools, "required", req.parallel_tool_calls)
    assert schema["type"] == "array" and schema["maxItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {"const": "f"}
    assert "maxItems" not in forced_schema(req.tools, "required", True)  # parallel calls: any number
    named = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [tool],
                                          "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert forced_schema(named.tools, named.tool_choice, True) == {"type": "object"}


def test_completion_top_logprobs_always_hold_the_chosen_token():
    """OpenAI: the sampled token is among top_logprobs, so up to k + 1 entries; logprobs 0 → exactly that token."""
    from raytp.api.openai import logprobs_body

    text = {1: "a", 2: "b", 3: "c"}.get
    body = logprobs_body(text, [3, 1, 2], [(-3.0, ((1, -0.5), (2, -1.0))), (-0.5, ((1, -0.5), (2, -1.0))),
                                           (-1.0, ())], chat=False)
    assert body["top_logprobs"] == [{"a": -0.5, "b": -1.0, "c": -3.0}, {"a": -0.5, "b": -1.0}, {"b": -1.0}]
    chat = logprobs_body(text, [3], [(-3.0, ((1, -0.5),))], chat=True)
    assert [t["token"] for t in chat["content"][0]["top_logprobs"]] == ["a"]  # chat: exactly top_logprobs


def test_seed_bounds_are_named_as_clients_parse_them():
    """The signed 64-bit range, refused with pydantic's bound names (vLLM clients read less_than_equal /
    greater_than_equal from the error's code)."""
    from raytp.errors import InvalidRequestError

    assert parse(CompletionRequest, {"prompt": "x", "seed": 2**63 - 1}).seed == 2**63 - 1
    for seed, code in ((2**63, "less_than_equal"), (-(2**63) - 1, "greater_than_equal")):
        with pytest.raises(InvalidRequestError) as e:
            parse(CompletionRequest, {"prompt": "x", "seed": seed})
        assert e.value.param == "seed" and e.value.code == code
