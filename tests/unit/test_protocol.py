import pytest

from raytp.api.openai import parse
from raytp.api.protocol import ChatCompletionRequest, CompletionRequest
from raytp.errors import InvalidRequestError


def test_completion_defaults_follow_openai():
    r = parse(CompletionRequest, {"model": "m", "prompt": "hi"})
    assert r.max_tokens == 16 and r.temperature == 1.0 and r.stop == [] and r.n == 1


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x"}, "model"),
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
