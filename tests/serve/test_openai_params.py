"""OpenAI parameters beyond one prompt → one choice, over HTTP through the real ingress, server and engine (a
scripted gang): batched prompts, n, stream options, sampling controls, the models / tokenize routes, and the
fields that only describe the caller."""

import json

import pytest
import requests

from tests.conftest import URL
from tests.serve.conftest import MODEL


def post(path, body):
    return requests.post(URL + path, json=body, timeout=60)


def completion(**body):
    r = post("/v1/completions", {"model": MODEL, "max_tokens": 6, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse(path, body) -> list[dict]:
    r = requests.post(URL + path, json={**body, "stream": True}, stream=True, timeout=60)
    assert r.status_code == 200, r.text
    lines = [ln[6:] for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_a_list_of_prompts_gives_one_choice_per_prompt_in_order(app, tiny_tokenizer):
    prompts = ["the model serves", "tokens", "requests arrive and stream"]
    solo = [completion(prompt=p)["choices"][0]["text"] for p in prompts]
    body = completion(prompt=prompts)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == solo
    assert body["usage"]["prompt_tokens"] == sum(len(tiny_tokenizer.encode(p)) for p in prompts)
    ids = [tiny_tokenizer.encode(p) for p in prompts]
    assert [c["text"] for c in completion(prompt=ids)["choices"]] == solo  # token-id lists too
    assert completion(prompt=ids[0])["choices"][0]["text"] == solo[0]


def test_n_choices_share_the_prompt_and_count_it_once(app, tiny_tokenizer):
    def hit_tokens():
        return requests.get(URL + "/health", timeout=30).json()["kv_cache"]["prefix_cache_hit_tokens"]

    before = hit_tokens()
    prompt = "n choices of one prompt share its blocks " * 3  # several full KV blocks, not sent before
    body = completion(prompt=prompt, n=3, temperature=1.0, seed=7, max_tokens=8)
    full_blocks = (len(tiny_tokenizer.encode(prompt)) - 1) // 16 * 16  # at least one token is recomputed
    assert hit_tokens() - before == 2 * full_blocks > 0, "choices 1 and 2 reused choice 0's full prompt blocks"
    texts = [c["text"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2] and len(set(texts)) == 3  # own seed streams
    assert texts == [c["text"] for c in completion(prompt=prompt, n=3, temperature=1.0, seed=7,
                                                    max_tokens=8)["choices"]]  # reproducible
    assert texts[0] == completion(prompt=prompt, temperature=1.0, seed=7, max_tokens=8)["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == len(tiny_tokenizer.encode(prompt))
    assert body["usage"]["completion_tokens"] == 24
    two = completion(prompt=["a b", "c d"], n=2)
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]
    assert two["choices"][0]["text"] == two["choices"][1]["text"]  # greedy choices agree


def test_streamed_choices_carry_their_index_and_usage(app):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "n": 2, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = sse("/v1/chat/completions", body)
    by_index: dict[int, list] = {0: [], 1: []}
    for ch in chunks[:-1]:
        (choice,) = ch["choices"]
        by_index[choice["index"]].append(choice)
        assert ch["usage"]["prompt_tokens"] > 0  # continuous usage stats
    for choices in by_index.values():
        assert choices[0]["delta"]["role"] == "assistant"
        assert choices[-1]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 10
    assert len(by_index[0]) + len(by_index[1]) == chunks[-1]["usage"]["completion_tokens"], "an event per token"
    # vLLM: usage rides on every chunk only when include_usage is on too
    quiet = sse("/v1/chat/completions", {**body, "stream_options": {"include_usage": False,
                                                                     "continuous_usage_stats": True}})
    assert quiet and not any("usage" in ch for ch in quiet)
    whole = post("/v1/chat/completions", {**body, "stream_options": None}).json()
    assert ["".join(c["delta"].get("content", "") for c in by_index[i]) for i in (0, 1)] == \
        [c["message"]["content"] for c in whole["choices"]]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_every_streamed_choice_has_one_chunk_per_token_with_the_openai_sdk(app, n):
    """As with n = 1 (and in vLLM): each choice's stream carries one chunk per generated token, never a step's or
    a choice's tokens merged. A chunk's text may be empty (a token that completes no character), so each
    chunk's logprobs show the one token it carries."""
    import openai

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
    common = dict(model=MODEL, n=n, max_tokens=5, temperature=1.0, seed=5, stream=True, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], logprobs=True, **common)
    text = client.completions.create(prompt="the model", logprobs=0, **common)
    for stream, tokens_of in ((chat, lambda c: [t.token for t in c.logprobs.content]),
                              (text, lambda c: c.logprobs.tokens)):
        per_index: dict[int, list] = {}
        for chunk in stream:
            for choice in chunk.choices:
                per_index.setdefault(choice.index, []).append(tokens_of(choice))
        assert sorted(per_index) == list(range(n))
        assert all(len(tokens) == 5 and all(len(t) == 1 for t in tokens) for tokens in per_index.values()), per_index

def test_stream_options_without_stream_is_refused(app):
    r = post("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]


def test_fields_that_only_describe_the_caller_are_accepted(app):
    plain = completion(prompt="the model")["choices"][0]["text"]
    body = completion(prompt="the model", user="u1", metadata={"team": "a"}, store=False, service_tier="auto",
                      prompt_cache_key="k", safety_identifier="s", best_of=1)
    assert body["choices"][0]["text"] == plain


def test_chat_content_as_text_parts_equals_a_string(app):
    def chat(content):
        r = post("/v1/chat/completions", {"model": MODEL, "max_tokens": 6, "temperature": 0,
                                          "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    assert chat([{"type": "text", "text": "the model "}, {"type": "text", "text": "serves"}]) == \
        chat("the model serves")


def test_sampling_controls_reach_the_engine(app, tiny_tokenizer):
    plain = completion(prompt="the model", max_tokens=8, logprobs=0)
    (first,) = tiny_tokenizer.encode(plain["choices"][0]["logprobs"]["tokens"][0], add_special_tokens=False)
    # stop at the first generated token: it ends the completion and its text is not returned
    stopped = completion(prompt="the model", max_tokens=8, stop_token_ids=[first])
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 1
    assert stopped["choices"][0]["text"] == ""
    # min_tokens keeps a stop string from ending the completion early
    first_word = plain["choices"][0]["text"][:2]
    assert completion(prompt="the model", max_tokens=8, stop=[first_word])["usage"]["completion_tokens"] < 8
    assert completion(prompt="the model", max_tokens=8, stop=[first_word], min_tokens=8)["usage"][
        "completion_tokens"] == 8


def test_model_card_tokenize_detokenize(app, tiny_tokenizer):
    r = requests.get(URL + f"/v1/models/{MODEL}", timeout=30)
    assert r.status_code == 200 and r.json()["id"] == MODEL
    r = requests.get(URL + "/v1/models/gpt-4", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    tok = post("/tokenize", {"model": MODEL, "prompt": "the model serves"}).json()
    assert tok["tokens"] == tiny_tokenizer.encode("the model serves") and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 256
    assert post("/detokenize", {"model": MODEL, "tokens": tok["tokens"]}).json()["prompt"] == "the model serves"
    chat = post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 1
    assert post("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}).status_code == 400
    assert post("/detokenize", {"tokens": [10**9]}).status_code == 400


def test_openai_sdk_n_and_prompt_lists(app):
    import openai

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
    c = client.completions.create(model=MODEL, prompt=["the model", "tokens"], max_tokens=4, temperature=0, n=2)
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    assert client.models.retrieve(MODEL).id == MODEL
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          n=2, temperature=0.9, seed=3, frequency_penalty=0.5, presence_penalty=0.5,
                                          logit_bias={"5": 1.0}, user="someone")
    assert len(chat.choices) == 2


@pytest.mark.parametrize("method", ["tokenize", "model", "completions", "chat_completions"])
def test_handle_api_has_the_new_calls_and_options(app, method):
    """The same options through DeploymentHandle calls as over HTTP."""
    if method == "tokenize":
        assert app.tokenize.remote({"prompt": "the model"}).result()["count"] > 0
    elif method == "model":
        assert app.model.remote(MODEL).result()["id"] == MODEL
    elif method == "completions":
        body = app.completions.remote({"model": MODEL, "prompt": ["a b", "c"], "n": 2, "logprobs": 1, "max_tokens": 3,
                                       "echo": True, "temperature": 0}).result()
        assert len(body["choices"]) == 4 and body["choices"][0]["logprobs"]["token_logprobs"][0] is None
    else:
        body = app.chat_completions.remote({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                            "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
                                            "max_tokens": 64}).result()
        assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    with pytest.raises(Exception, match="best_of"):
        app.completions.remote({"model": MODEL, "prompt": "x", "best_of": 3}).result()


def test_completion_logprobs_in_openai_shape_streamed_or_not(app, tiny_tokenizer):
    body = completion(prompt="the model", max_tokens=5, logprobs=2)
    lp = body["choices"][0]["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"] == [-0.5] * n  # the scripted executor's distribution
    assert all(len(top) == 2 and top[tok] == -0.5 for top, tok in zip(lp["top_logprobs"], lp["tokens"]))
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    chunks = sse("/v1/completions", {"model": MODEL, "prompt": "the model", "max_tokens": 5, "temperature": 0,
                                     "logprobs": 2})
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [t for x in streamed for t in x["tokens"]] == lp["tokens"]
    assert [o for x in streamed for o in x["text_offset"]] == lp["text_offset"]
    assert completion(prompt="the model")["choices"][0]["logprobs"] is None


def test_chat_logprobs_with_the_openai_sdk(app):
    import openai

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(item.logprob == -0.5 and len(item.top_logprobs) == 3 and bytes(item.bytes).decode() == item.token
               for item in content)


def test_echo_scores_the_prompt_as_lm_eval_asks(app, tiny_tokenizer):
    """lm-evaluation-harness' log-likelihood request: token-id prompts, echo, logprobs, max_tokens 0."""
    prompts = [tiny_tokenizer.encode("the model serves tokens"), tiny_tokenizer.encode("requests arrive")]
    body = completion(prompt=prompts, echo=True, logprobs=1, max_tokens=0)
    for choice, ids in zip(body["choices"], prompts):
        lp = choice["logprobs"]
        assert choice["text"] == tiny_tokenizer.decode(ids)
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == [-1.0] * (len(ids) - 1)  # the scripted executor's prompt logprobs
    assert body["usage"]["completion_tokens"] == 0
    echoed = completion(prompt="the model", echo=True, max_tokens=3)
    assert echoed["choices"][0]["text"] == "the model" + completion(prompt="the model", max_tokens=3)["choices"][0][
        "text"]
    chunks = sse("/v1/completions", {"model": MODEL, "prompt": "the model", "max_tokens": 3, "temperature": 0,
                                     "echo": True})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == echoed["choices"][0]["text"]
    with_lp = completion(prompt="the model", echo=True, max_tokens=2, logprobs=0)["choices"][0]["logprobs"]
    n_prompt = len(tiny_tokenizer.encode("the model"))
    assert len(with_lp["tokens"]) == n_prompt + 2 and with_lp["token_logprobs"][n_prompt:] == [-0.5, -0.5]
    assert with_lp["text_offset"] == [sum(len(t) for t in with_lp["tokens"][:i]) for i in range(n_prompt + 2)]


def test_structured_output_with_the_openai_sdk_parse(app):
    from typing import Literal

    import openai
    from pydantic import BaseModel

    class Answer(BaseModel):
        ok: bool
        color: Literal["red", "green", "blue"]

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "pick"}],
                                           response_format=Answer, max_tokens=64, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    body = completion(prompt="x", max_tokens=64, n=3, temperature=1.0, seed=1, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": {
            **Answer.model_json_schema(), "additionalProperties": False}}})  # a closed object: the output must end
    assert all(Answer.model_validate_json(c["text"]) and c["finish_reason"] == "stop" for c in body["choices"]), body
    text = completion(prompt="x", max_tokens=8, response_format={"type": "json_object"})["choices"][0]["text"]
    assert text.startswith("{")
    assert completion(prompt="x", max_tokens=3, response_format={"type": "text"})["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "objectx"}}},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string", "pattern": "(a"}}},
    {"type": "xml"},
])
def test_bad_response_formats_are_400(app, response_format):
    r = post("/v1/completions", {"model": MODEL, "prompt": "x", "response_format": response_format})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format"), r.text


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["paris", "rome"]}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_named_and_required_tool_calls_always_parse(app):
    import openai

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "weather in paris?"}]
    named = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK], max_tokens=64,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}
    required = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK], max_tokens=64,
                                              tool_choice="required", parallel_tool_calls=False, n=2,
                                              temperature=1.0, seed=4)
    for choice in required.choices:
        (call,) = choice.message.tool_calls
        args = json.loads(call.function.arguments)
        assert (call.function.name, set(args)) in (("get_weather", {"city", "unit"}), ("get_time", {"zone"}))
    stream = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=64,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stream=True)
    deltas = [ch.choices[0] for ch in stream if ch.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert deltas[-1].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["get_weather"]
    assert set(json.loads(calls[0].function.arguments)) == {"city", "unit"}


def test_a_conversation_with_tool_turns_is_accepted(app):
    history = [{"role": "user", "content": "weather in rome?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": "{\"city\": \"rome\", \"unit\": \"c\"}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    r = post("/v1/chat/completions", {"model": MODEL, "messages": history, "tools": [WEATHER], "tool_choice": "none",
                                      "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text


@pytest.mark.parametrize("body,param", [
    ({"tools": [WEATHER]}, "tool_choice"),  # auto (the default) needs the server's tool_call_parser
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
    ({"tool_choice": "required"}, None),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, None),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
])
def test_tool_requests_the_server_cannot_honour_are_400(app, body, param):
    r = post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_langchain_bind_tools_and_with_structured_output(app):
    from typing import Literal

    pytest.importorskip("langchain_openai")

    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """Weather in a city."""

        city: Literal["paris", "rome"] = Field(description="the city")

    class Verdict(BaseModel):
        ok: bool
        color: Literal["red", "green"]

    llm = ChatOpenAI(model=MODEL, base_url=URL + "/v1", api_key="unused", max_tokens=64, temperature=0)
    # strict: a closed schema (the scripted gang would otherwise add properties until max_tokens, as it may)
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather", strict=True).invoke("weather in rome?")
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather" and call["args"]["city"] in ("paris", "rome")
    follow_up = llm.bind_tools([GetWeather], tool_choice="none").invoke(
        [HumanMessage("weather in rome?"), message, ToolMessage("21 degrees", tool_call_id=call["id"])])
    assert isinstance(follow_up.content, str) and not follow_up.tool_calls
    verdict = llm.with_structured_output(Verdict).invoke("is it fine?")
    assert isinstance(verdict, Verdict)
