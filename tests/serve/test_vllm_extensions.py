"""vLLM's extensions and leniency over HTTP, through the real ingress, server and engine (a scripted gang): the
fields evaluation / RL frameworks and agents written against vLLM send, in vLLM's response shapes, and a clear
400 naming the field for what raytp refuses. The tiny model's numbers for the same fields are checked in
tests/unit/test_openai_extensions_model.py."""

import re

import pytest
import requests

from tests.conftest import URL
from tests.serve.conftest import MODEL
from tests.serve.test_openai_params import WEATHER, completion, post, sse


def chat(**body):
    r = post("/v1/chat/completions", {"model": MODEL, "max_tokens": 6, "temperature": 0,
                                      "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 200, r.text
    return r.json()


def refused(path, body) -> dict:
    r = post(path, body)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_unknown_fields_anywhere_are_ignored(app):
    plain = completion(prompt="the model")["choices"][0]["text"]
    assert completion(prompt="the model", x_other_server_option={"a": 1}, priority=0)["choices"][0]["text"] == plain
    said = chat()["choices"][0]["message"]["content"]
    lenient = chat(messages=[{"role": "user", "content": "hi", "x_note": "for another server"}],
                   stream_options=None, x_top={"nested": True})
    assert lenient["choices"][0]["message"]["content"] == said


def test_a_custom_role_reaches_a_template_that_renders_it(app, tiny_tokenizer):
    messages = [{"role": "reviewer", "content": "looks good"}, {"role": "user", "content": "ship it?"}]
    body = chat(messages=messages)
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|reviewer|>" in text
    assert body["usage"]["prompt_tokens"] == len(tiny_tokenizer.encode(text, add_special_tokens=False))


def test_prompt_logprobs_in_vllms_shape(app, tiny_tokenizer):
    ids = tiny_tokenizer.encode("the model serves tokens")
    body = completion(prompt=ids, prompt_logprobs=1, max_tokens=2)
    # the scripted gang scores every prompt token -1.0 at rank 1 (it is its own top alternative)
    want = [None] + [{str(t): {"logprob": -1.0, "rank": 1, "decoded_token": tiny_tokenizer.decode([t])}}
                     for t in ids[1:]]
    assert body["choices"][0]["prompt_logprobs"] == want
    assert body["choices"][0]["logprobs"] is None and body["choices"][0]["text"] == completion(
        prompt=ids, max_tokens=2)["choices"][0]["text"]
    both = completion(prompt=[ids, ids[:3]], prompt_logprobs=0, max_tokens=1, n=2)
    assert [len(c["prompt_logprobs"]) for c in both["choices"]] == [len(ids)] * 2 + [3] * 2
    assert completion(prompt=ids)["choices"][0]["prompt_logprobs"] is None  # vLLM: the key, null when not asked
    in_chat = chat(prompt_logprobs=0, n=2)
    assert len(in_chat["prompt_logprobs"]) == in_chat["usage"]["prompt_tokens"]  # vLLM: beside the choices
    assert in_chat["prompt_logprobs"][0] is None and all(len(d) == 1 for d in in_chat["prompt_logprobs"][1:])
    # echo's logprobs and prompt_logprobs side by side, each with its own number of alternatives
    echoed = completion(prompt=ids, echo=True, logprobs=0, prompt_logprobs=1, max_tokens=1)["choices"][0]
    assert echoed["logprobs"]["token_logprobs"][:len(ids)] == [None] + [-1.0] * (len(ids) - 1)
    assert echoed["prompt_logprobs"] == want


def test_prompt_logprobs_key_is_null_when_not_asked_as_in_vllm(app):
    """vLLM's bodies always carry the key: per choice in completions, beside the choices in chat."""
    import openai

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
    text = client.completions.create(model=MODEL, prompt=["a b", "c"], n=2, max_tokens=2)
    assert all("prompt_logprobs" in c.model_extra and c.prompt_logprobs is None for c in text.choices)
    said = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "prompt_logprobs" in said.model_extra and said.prompt_logprobs is None
    assert "prompt_logprobs" not in said.choices[0].model_extra  # chat: top level only

def test_prompt_logprobs_are_refused_in_a_stream_as_vllm_does(app):
    err = refused("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True})
    assert err["param"] == "prompt_logprobs" and "not available when `stream=True`" in err["message"]
    chunks = sse("/v1/completions", {"prompt": "x", "max_tokens": 2, "prompt_logprobs": 0})  # 0 passes, as in vLLM
    assert chunks and not any("prompt_logprobs" in c["choices"][0] for c in chunks if c["choices"])


def test_return_tokens_as_token_ids_and_allowed_token_ids(app, tiny_tokenizer):
    allowed = tiny_tokenizer.encode(" model tokens ranks", add_special_tokens=False)
    body = completion(prompt="the model", max_tokens=8, logprobs=1, return_tokens_as_token_ids=True,
                      allowed_token_ids=allowed)
    lp = body["choices"][0]["logprobs"]
    assert all(re.fullmatch(r"token_id:\d+", t) for t in lp["tokens"])
    ids = [int(t.split(":")[1]) for t in lp["tokens"]]
    assert set(ids) <= set(allowed) and body["choices"][0]["text"] == tiny_tokenizer.decode(ids)
    assert all(set(top) >= {tok} and all(k.startswith("token_id:") for k in top)
               for top, tok in zip(lp["top_logprobs"], lp["tokens"]))
    content = chat(logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True)["choices"][0]["logprobs"]["content"]
    assert all(item["token"].startswith("token_id:") and bytes(item["bytes"]).decode() == item["token"]
               for item in content)
    assert refused("/v1/completions", {"prompt": "x", "allowed_token_ids": [10**6]})["param"] == "allowed_token_ids"


def test_skip_special_tokens_and_include_stop_str_in_output(app, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    # only EOS allowed, EOS ignored: three special tokens, whose text is dropped by default (vLLM's) or kept
    specials = {"prompt": "x", "max_tokens": 3, "allowed_token_ids": [eos], "ignore_eos": True}
    assert completion(**specials)["choices"][0]["text"] == ""
    assert completion(**specials, skip_special_tokens=False)["choices"][0]["text"] == tiny_tokenizer.eos_token * 3
    plain = completion(prompt="the model", max_tokens=8)["choices"][0]["text"]
    stop = plain[3:5]
    cut = plain.index(stop)
    assert completion(prompt="the model", max_tokens=8, stop=[stop])["choices"][0]["text"] == plain[:cut]
    kept = completion(prompt="the model", max_tokens=8, stop=[stop], include_stop_str_in_output=True)["choices"][0]
    assert kept["text"] == plain[:cut + len(stop)] and kept["finish_reason"] == "stop"
    first = completion(prompt="the model", max_tokens=1, logprobs=0, return_tokens_as_token_ids=True)
    first = int(first["choices"][0]["logprobs"]["tokens"][0].split(":")[1])
    by_token = completion(prompt="the model", max_tokens=8, stop_token_ids=[first], include_stop_str_in_output=True)
    assert by_token["choices"][0]["text"] == tiny_tokenizer.decode([first])  # the stop token's text stays


def test_truncate_prompt_tokens_keeps_the_last_ones(app, tiny_tokenizer):
    ids = tiny_tokenizer.encode("requests arrive and stream while the gang keeps every shard")
    body = completion(prompt=ids, truncate_prompt_tokens=4, echo=True, max_tokens=2)
    assert body["usage"]["prompt_tokens"] == 4
    assert body["choices"][0]["text"].startswith(tiny_tokenizer.decode(ids[-4:]))
    assert body["choices"][0]["text"] == completion(prompt=ids[-4:], echo=True, max_tokens=2)["choices"][0]["text"]
    text_prompt = completion(prompt="the model serves tokens", truncate_prompt_tokens=2)
    assert text_prompt["usage"]["prompt_tokens"] == 2
    err = refused("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 300})  # max_model_len is 256
    assert err["param"] == "truncate_prompt_tokens" and "max_model_len" in err["message"]


def test_chat_echo_generation_prompt_and_continue_final_message(app, tiny_tokenizer):
    messages = [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "The colour is"}]
    cont = chat(messages=messages, add_generation_prompt=False, continue_final_message=True, echo=True)
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("The colour is") and cont["usage"]["prompt_tokens"] == len(
        tiny_tokenizer.encode(text, add_special_tokens=False))
    without_echo = chat(messages=messages, add_generation_prompt=False, continue_final_message=True)
    assert cont["choices"][0]["message"]["content"] == "The colour is" + without_echo["choices"][0]["message"][
        "content"]
    assert chat(echo=True)["choices"][0]["message"]["content"] == chat()["choices"][0]["message"]["content"]
    no_header = chat(add_generation_prompt=False)["usage"]["prompt_tokens"]
    assert no_header == len(tiny_tokenizer.encode(tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False), add_special_tokens=False)) < chat()["usage"][
        "prompt_tokens"]
    streamed = sse("/v1/chat/completions", {"messages": messages, "add_generation_prompt": False,
                                            "continue_final_message": True, "echo": True, "max_tokens": 6,
                                            "temperature": 0})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed if c["choices"]) == \
        cont["choices"][0]["message"]["content"]
    err = refused("/v1/chat/completions", {"messages": messages, "continue_final_message": True})
    assert err["param"] == "continue_final_message" and "add_generation_prompt" in err["message"]
    tokens = post("/tokenize", {"messages": messages, "add_generation_prompt": False,
                                "continue_final_message": True}).json()["tokens"]
    assert tokens == tiny_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("fields,check", [
    ({"structured_outputs": {"regex": "[0-9]{3}"}}, lambda t: re.fullmatch("[0-9]{3}", t)),
    ({"guided_regex": "(ab|cd){2}e"}, lambda t: re.fullmatch("(ab|cd){2}e", t)),
    ({"structured_outputs": {"choice": ["yes", "no", "it \"depends\""]}}, lambda t: t in ("yes", "no",
                                                                                        'it "depends"')),
    ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
    ({"structured_outputs": {"grammar": 'start: "x" NUM\nNUM: /[0-9]{2}/'}}, lambda t: re.fullmatch("x[0-9]{2}", t)),
    ({"guided_grammar": 'root ::= "a" [b-c] "d"'}, lambda t: re.fullmatch("a[b-c]d", t)),  # GBNF too
    ({"structured_outputs": {"json": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                      "required": ["ok"], "additionalProperties": False}}},
     lambda t: __import__("json").loads(t).keys() == {"ok"}),
    ({"guided_json": '{"type": "array", "items": {"type": "integer"}, "maxItems": 2}'},
     lambda t: isinstance(__import__("json").loads(t), list)),
    ({"structured_outputs": {"json_object": True}}, lambda t: t.startswith("{")),
])
def test_structured_output_fields_constrain_the_output(app, fields, check):
    body = completion(prompt="x", max_tokens=48, n=2, temperature=1.0, seed=3, **fields)
    bounded = "json_object" not in str(fields)  # any object may go on past max_tokens; the others must end
    for choice in body["choices"]:
        assert check(choice["text"]) and (choice["finish_reason"] == "stop" or not bounded), (fields, choice)


@pytest.mark.parametrize("fields,param", [
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
    ({"guided_grammar": "start: nothing_defined"}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),  # one constraint only
    ({"structured_outputs": {"choice": ["a"]}, "guided_choice": ["b"]}, "guided_choice"),
    ({"best_of": 2}, "best_of"),
])
def test_fields_raytp_cannot_honour_are_400_naming_them(app, fields, param):
    err = refused("/v1/completions", {"prompt": "x", **fields})
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    if param == "best_of":
        assert "not supported" in err["message"] and "use n" in err["message"]  # why, and what to do instead


def test_beam_search_returns_the_n_best_beams(app, tiny_tokenizer):
    """The scripted gang scores its greedy token -0.5 and the next vocabulary entries -1, -2, ...: the best beam
    is the greedy output, the second leaves it once, for a -1 token. Sampling fields change nothing (vLLM's)."""
    greedy = completion(prompt="the model", max_tokens=4, logprobs=0, return_tokens_as_token_ids=True)["choices"][0]
    body = completion(prompt="the model", max_tokens=4, n=2, use_beam_search=True, logprobs=0, temperature=0.7,
                      return_tokens_as_token_ids=True, length_penalty=0.5)
    best, second = body["choices"]
    assert [best["index"], second["index"]] == [0, 1] and best["logprobs"]["tokens"] == greedy["logprobs"]["tokens"]
    assert sum(a != b for a, b in zip(second["logprobs"]["tokens"], best["logprobs"]["tokens"])) == 1
    assert [sum(c["logprobs"]["token_logprobs"]) for c in body["choices"]] == [-2.0, -2.5]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"]["completion_tokens"] == 8 and body["usage"]["prompt_tokens"] == len(
        tiny_tokenizer.encode("the model"))
    # streamed: each choice once, whole, when the search has ended; then the usage
    chunks = sse("/v1/completions", {"model": MODEL, "prompt": "the model", "max_tokens": 4, "n": 2,
                                     "use_beam_search": True, "logprobs": 0, "return_tokens_as_token_ids": True,
                                     "stream_options": {"include_usage": True}})
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [best["text"], second["text"]]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == ["length", "length"]
    assert chunks[-1]["usage"] == body["usage"]
    in_chat = chat(use_beam_search=True, n=2)
    assert len(in_chat["choices"]) == 2 and in_chat["usage"]["completion_tokens"] == 12
    assert in_chat["choices"][0]["message"]["content"] == chat()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("fields,param", [
    ({"stop": ["x"]}, "stop"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"guided_regex": "a+"}, "guided_regex"),
    ({"use_beam_search": False, "length_penalty": 0.5}, "length_penalty"),
    ({"n": 3, "max_tokens": 1, "allowed_token_ids": [11, 12]}, "n"),  # two tokens make at most two beams
    ({"echo": True, "max_tokens": 0}, "max_tokens"),
])
def test_beam_search_refuses_what_it_cannot_honour_naming_the_field(app, fields, param):
    err = refused("/v1/completions", {"model": MODEL, "prompt": "x", "use_beam_search": True, **fields})
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_beam_search_refuses_a_forced_tool_call(app):
    err = refused("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                           "tools": [WEATHER], "tool_choice": "required", "use_beam_search": True})
    assert err["param"] == "tool_choice" and "use_beam_search" in err["message"]


def test_tools_with_a_structured_output_field_are_refused(app):
    err = refused("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                                           "tool_choice": "required", "guided_regex": "a"})
    assert "cannot constrain the same output" in err["message"]


def test_vllm_fields_through_the_openai_sdk_extra_body(app, tiny_tokenizer):
    import openai

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
    ids = tiny_tokenizer.encode("the model serves tokens")
    allowed = tiny_tokenizer.encode(" model tokens", add_special_tokens=False)
    c = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0.8, seed=1, logprobs=1,
                                  extra_body={"prompt_logprobs": 1, "min_p": 0.1, "top_k": 5,
                                              "allowed_token_ids": allowed, "return_tokens_as_token_ids": True,
                                              "truncate_prompt_tokens": 3, "skip_special_tokens": True,
                                              "include_stop_str_in_output": False, "x_unknown": 1})
    choice = c.choices[0]
    assert c.usage.prompt_tokens == 3 and len(choice.prompt_logprobs) == 3 and choice.prompt_logprobs[0] is None
    assert {int(t.split(":")[1]) for t in choice.logprobs.tokens} <= set(allowed)
    r = client.chat.completions.create(
        model=MODEL, max_tokens=32, temperature=0,
        messages=[{"role": "user", "content": "pick"}, {"role": "assistant", "content": "I pick"}],
        extra_body={"echo": True, "add_generation_prompt": False, "continue_final_message": True,
                    "chat_template_kwargs": {"enable_thinking": False}, "prompt_logprobs": 0,
                    "structured_outputs": {"regex": " (red|blue)"}})
    assert re.fullmatch("I pick (red|blue)", r.choices[0].message.content)
    assert r.model_extra["prompt_logprobs"][0] is None and len(r.model_extra["prompt_logprobs"]) == \
        r.usage.prompt_tokens
    guided = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok?"}],
                                            max_tokens=8, extra_body={"guided_choice": ["yes", "no"]})
    assert guided.choices[0].message.content in ("yes", "no")
    beams = client.completions.create(model=MODEL, prompt="x", n=2, max_tokens=3,
                                      extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert len(beams.choices) == 2 and beams.usage.completion_tokens == 6
    default_tools = requests.post(URL + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]})
    assert default_tools.status_code == 400 and default_tools.json()["error"]["param"] == "tool_choice"


@pytest.mark.parametrize("stream", [False, True])
def test_masked_alternatives_logprobs_are_floored_as_vllm_does(app, stream):
    """Guided decoding masks most alternatives (logprob -inf, which JSON cannot carry): vLLM reports -9999.0."""
    import openai

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
    guide = {"structured_outputs": {"choice": ["yes", "no"]}}
    chat_kw = dict(model=MODEL, messages=[{"role": "user", "content": "ok?"}], max_tokens=8, logprobs=True,
                   top_logprobs=5, extra_body=guide, stream=stream)
    text_kw = dict(model=MODEL, prompt="ok?", max_tokens=8, logprobs=5, echo=not stream, extra_body=guide,
                   stream=stream)
    if stream:
        chat_lp = [c.choices[0].logprobs for c in client.chat.completions.create(**chat_kw)
                   if c.choices and c.choices[0].logprobs]
        text_lp = [c.choices[0].logprobs for c in client.completions.create(**text_kw)
                   if c.choices and c.choices[0].logprobs]
    else:
        chat_lp = [client.chat.completions.create(**chat_kw).choices[0].logprobs]
        text_lp = [client.completions.create(**text_kw).choices[0].logprobs]
    values = [x for lp in chat_lp for item in lp.content for x in [item.logprob] + [
        t.logprob for t in item.top_logprobs]]
    values += [x for lp in text_lp for x in lp.token_logprobs + [v for top in lp.top_logprobs if top
                                                                   for v in top.values()] if x is not None]
    assert min(values) == -9999.0 and all(v >= -9999.0 for v in values), values  # NaN fails >= too


def test_seed_out_of_range_names_the_bound_as_vllm_does(app):
    """vLLM's 400 quotes pydantic's error: clients match less_than_equal / greater_than_equal in the message."""
    import openai

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as above:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, seed=2**63)
    with pytest.raises(openai.BadRequestError) as below:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       seed=-(2**63) - 1)
    for e, bound in ((above, "less_than_equal"), (below, "greater_than_equal")):
        assert e.value.body["param"] == "seed" and e.value.body["code"] == bound, e.value.body
        assert bound in e.value.body["message"] and str(2**63 - 1 if bound == "less_than_equal" else -(2**63)) in \
            e.value.body["message"]
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2, seed=2**63 - 1).choices  # the bound
