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
    ({"model": "m", "prompt": "x", "response_format": {"type": "yaml"}}, "response_format.type"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "length_penalty": 0.5}, "length_penalty"),  # only with use_beam_search
    ({"prompt": "x", "bad_words": ["no"]}, "bad_words"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
    ({"prompt": "x", "allowed_token_ids": ["a"]}, "allowed_token_ids.0"),
    ({"prompt": "x", "prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),  # vLLM's rule (0 passes)
    ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"prompt": "x", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"prompt": "x", "structured_outputs": {"regex": "a+", "choice": ["b"]}}, "structured_outputs"),
    ({"prompt": "x", "structured_outputs": {}}, "structured_outputs"),
    ({"prompt": "x", "structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs.structural_tag"),
    ({"prompt": "x", "guided_choice": []}, "guided_choice"),
    ({"prompt": "x", "skip_special_tokens": "maybe"}, "skip_special_tokens"),
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
    beams = parse(CompletionRequest, {"prompt": "x", "use_beam_search": True, "n": 4, "length_penalty": 0.5})
    assert beams.use_beam_search and beams.length_penalty == 0.5


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



def test_non_finite_logprobs_are_floored_in_every_body():
    """-inf (a masked token) and NaN cannot be JSON; every logprobs shape reports them as vLLM's -9999.0."""
    import json

    from raytp.api.openai import logprobs_body, prompt_logprobs_body

    inf, nan = float("-inf"), float("nan")
    text = {1: "a", 2: "b", 3: "c"}.get
    entries = [(inf, ((1, -0.5), (2, inf))), (nan, ((3, nan),)), None]
    bodies = [logprobs_body(text, [3, 1, 2], entries, chat=False), logprobs_body(text, [3, 1], entries[:2], chat=True),
              prompt_logprobs_body(text, [1, 2, 3], [(inf, ((1, nan),), 2), (-0.5, ((3, -0.5),), 1)], 1)]
    for body in bodies:
        json.dumps(body, allow_nan=False)  # what a response encoder demands
    assert bodies[0]["token_logprobs"] == [-9999.0, -9999.0, None]
    assert bodies[0]["top_logprobs"][0] == {"a": -0.5, "b": -9999.0, "c": -9999.0}
    assert bodies[1]["content"][1]["logprob"] == bodies[1]["content"][1]["top_logprobs"][0]["logprob"] == -9999.0
    assert bodies[2][1] == {"2": {"logprob": -9999.0, "rank": 2, "decoded_token": "b"},
                            "1": {"logprob": -9999.0, "rank": 1, "decoded_token": "a"}}

def test_seed_bounds_are_named_as_clients_parse_them():
    """The signed 64-bit range, refused with pydantic's bound names in the code and in the message (vLLM's
    message quotes pydantic's error; clients match less_than_equal / greater_than_equal in it)."""
    from raytp.errors import InvalidRequestError

    assert parse(CompletionRequest, {"prompt": "x", "seed": 2**63 - 1}).seed == 2**63 - 1
    for seed, code in ((2**63, "less_than_equal"), (-(2**63) - 1, "greater_than_equal")):
        with pytest.raises(InvalidRequestError) as e:
            parse(CompletionRequest, {"prompt": "x", "seed": seed})
        assert e.value.param == "seed" and e.value.code == code and f"[type={code}]" in e.value.message
    with pytest.raises(InvalidRequestError) as e:  # our validators' own messages carry no type
        parse(CompletionRequest, {"prompt": "x", "length_penalty": 2.0})
    assert "type=" not in e.value.message


def test_unknown_fields_are_ignored_and_logged_once_by_name(caplog):
    """vLLM's leniency: unknown top-level, per-message and nested fields are accepted and dropped; each name is
    logged once per process at INFO, never its value (it may be prompt text)."""
    import logging

    from raytp.api import lenient

    lenient._logged_fields.clear()  # the once-per-process record: other tests in this process may have filled it

    body = {"messages": [{"role": "user", "content": "hi", "x_secret_note": "PROMPT TEXT"}],
            "x_vendor_option": "PROMPT TEXT", "response_format": {"type": "json_object", "x_extra": 1}}
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        req = parse(ChatCompletionRequest, body)
        parse(ChatCompletionRequest, body)
    assert req.messages[0].text == "hi" and req.response_format.type == "json_object"
    assert "x_vendor_option" not in req.model_dump() and "x_secret_note" not in req.messages[0].model_dump()
    lines = [r.getMessage() for r in caplog.records if "ignoring unknown request field" in r.getMessage()]
    assert sorted(lines) == sorted(set(lines)) and len(lines) == 3, lines  # each name once, though sent twice
    assert any("'request.x_vendor_option'" in ln for ln in lines) and any("'messages.x_secret_note'" in ln
                                                                         for ln in lines)
    assert not any("PROMPT TEXT" in r.getMessage() for r in caplog.records)
    # known fields stay strict
    with pytest.raises(InvalidRequestError) as e:
        parse(ChatCompletionRequest, {**body, "temperature": "hot"})
    assert e.value.param == "temperature"


def test_any_role_string_parses_and_the_template_options_are_checked():
    r = parse(ChatCompletionRequest, {"messages": [{"role": "reviewer", "content": "looks good"}]})
    assert r.messages[0].for_template() == {"role": "reviewer", "content": "looks good"}
    with pytest.raises(InvalidRequestError) as e:  # add_generation_prompt defaults to true, as in vLLM
        parse(ChatCompletionRequest, {"messages": [{"role": "assistant", "content": "a"}],
                                      "continue_final_message": True})
    assert e.value.param == "continue_final_message" and "Cannot set both" in e.value.message
    ok = parse(ChatCompletionRequest, {"messages": [{"role": "assistant", "content": "a"}], "echo": True,
                                       "continue_final_message": True, "add_generation_prompt": False,
                                       "chat_template_kwargs": {"enable_thinking": False}})
    assert ok.continue_final_message and ok.chat_template_kwargs == {"enable_thinking": False}
    for field, value in (("functions", [{"name": "f"}]), ("chat_template", "{{ x }}"), ("documents", [{}])):
        with pytest.raises(InvalidRequestError) as e:
            parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}], field: value})
        assert e.value.param == field and "not supported" in e.value.message


def test_structured_output_fields_map_to_one_constraint_each():
    def constraints(**fields):
        return parse(CompletionRequest, {"prompt": "x", **fields}).structured_constraints()

    assert constraints() == [] and constraints(response_format={"type": "text"}) == []
    assert constraints(structured_outputs={"json": {"type": "object"}}) == [
        ("structured_outputs.json", "json", {"type": "object"})]
    assert constraints(structured_outputs={"choice": ["a", "b"]}) == [("structured_outputs.choice", "choice",
                                                                       ["a", "b"])]
    assert constraints(guided_regex="[0-9]+", guided_grammar="start: \"a\"") == [
        ("guided_regex", "regex", "[0-9]+"), ("guided_grammar", "grammar", 'start: "a"')]
    assert constraints(response_format={"type": "json_object"}) == [("response_format", "json_object", None)]


def test_prompt_logprobs_body_is_vllms_shape():
    """null first; then per prompt token {token id as a string: {logprob, rank, decoded_token}}, the prompt token
    itself and its k most likely alternatives."""
    from raytp.api.openai import prompt_logprobs_body

    text = {1: "a", 2: "b", 3: "c"}.get
    entries = [(-2.0, ((1, -0.1), (3, -1.0)), 3), (-0.1, ((1, -0.1), (2, -2.5)), 1)]
    body = prompt_logprobs_body(text, [2, 2, 1], entries, 1)
    assert body == [None,
                    {"2": {"logprob": -2.0, "rank": 3, "decoded_token": "b"},
                     "1": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}},
                    {"1": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}}]
    assert prompt_logprobs_body(text, [2, 2], entries[:1], 0) == [None, {"2": {"logprob": -2.0, "rank": 3,
                                                                              "decoded_token": "b"}}]
