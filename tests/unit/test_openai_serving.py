"""The OpenAI layer of a replica (``OpenAIServing``) over the real engine and a scripted gang, no Ray: what depends
on the model's chat template — the tool-call parser detected from it, roles it refuses, the variables and options
vLLM's chat fields pass to it."""

import asyncio
import contextlib
import json
import logging

import pytest

from raytp.errors import InvalidRequestError

# A Hermes / Qwen-shaped template: tool calls inside <tool_call> tags, only the usual roles (anything else raises,
# as many templates do), and a Qwen3-style enable_thinking switch.
HERMES_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('Conversation roles must be system, user, assistant or tool') }}{%- endif -%}"
    "<|{{ m['role'] }}|>\n"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}"
    "{%- for c in m['tool_calls'] -%}<tool_call>{{ c['function'] | tojson }}</tool_call>{%- endfor -%}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}</s>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>\n"
    "{%- if enable_thinking is defined and not enable_thinking -%}<think></think>{%- endif -%}{%- endif -%}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def hermes_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = HERMES_TEMPLATE
    return tok


def run(tokenizer, calls, scripts=None, **config):
    """Start an engine over a scripted gang, build the replica's OpenAI layer, ``await calls(serving)``."""
    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.serve.openai_serving import OpenAIServing
    from raytp.testing import ScriptedExecutor, plain_token_ids

    cfg = resolve({"model": "raytp-tiny-llama", "tensor_parallel_size": 1, "device": "cpu", "max_model_len": 256,
                   **config})

    async def main():
        engine = make_engine(cfg, ScriptedExecutor(plain_token_ids(tokenizer), scripts=scripts), tokenizer)
        await engine.start(warmup=False)
        try:
            return await calls(OpenAIServing(cfg, tokenizer, engine))
        finally:
            engine.shutdown()

    return asyncio.run(main())


@contextlib.contextmanager
def logged():
    """The INFO records of Serve's logger (it does not propagate once Serve configured it, so caplog misses them)."""
    import raytp.serve.openai_serving  # noqa: F401 - Serve sets its logger's handlers up on import

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("ray.serve")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def chat_body(**fields):
    return {"messages": [{"role": "user", "content": "weather in rome?"}], "max_tokens": 40, "temperature": 0,
            **fields}


def test_a_hermes_template_makes_tool_choice_auto_parse_hermes_calls(hermes_tokenizer):
    tok = hermes_tokenizer
    first = tok.encode(tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False),
                       add_special_tokens=False)[0]  # the scripted gang plays a script by the prompt's first token
    said = '<tool_call>{"name": "get_weather", "arguments": {"city": "rome"}}</tool_call>'
    scripts = {first: tok.encode(said, add_special_tokens=False) + [tok.eos_token_id]}

    async def calls(serving):
        assert serving.tool_call_parser == "hermes"
        return await serving.completion(chat_body(tools=[WEATHER], max_tokens=100), chat=True)  # auto: default

    with logged() as records:
        body = run(tok, calls, scripts)
    assert any("detected 'hermes' from the chat template" in r.getMessage() for r in records)
    (choice,) = body["choices"]
    (call,) = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "rome"}


def test_without_a_detectable_parser_tool_choice_auto_is_a_400(tiny_tokenizer):
    async def calls(serving):
        assert serving.tool_call_parser is None  # the tiny model's template renders no <tool_call>
        with pytest.raises(InvalidRequestError) as e:
            await serving.completion(chat_body(tools=[WEATHER]), chat=True)
        return e.value

    err = run(tiny_tokenizer, calls)
    assert err.param == "tool_choice" and "none was detected" in err.message


def test_a_configured_parser_wins_over_detection(tiny_tokenizer):
    async def calls(serving):
        return serving.tool_call_parser

    assert run(tiny_tokenizer, calls, tool_call_parser="hermes") == "hermes"


def test_a_role_the_template_refuses_is_a_400_naming_it(hermes_tokenizer, tiny_tokenizer):
    body = chat_body(messages=[{"role": "reviewer", "content": "looks good"}, {"role": "user", "content": "ok?"}])

    async def refused(serving):
        with pytest.raises(InvalidRequestError) as e:
            await serving.completion(body, chat=True)
        return e.value

    err = run(hermes_tokenizer, refused)
    assert err.param == "messages" and "'reviewer'" in err.message and "roles must be" in err.message

    async def accepted(serving):  # a template that renders any role: the role reaches it
        return serving.tokenize({"messages": body["messages"], "add_generation_prompt": True})["tokens"]

    rendered = tiny_tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
    assert "<|reviewer|>" in rendered
    assert run(tiny_tokenizer, accepted) == tiny_tokenizer.encode(rendered, add_special_tokens=False)


def test_chat_template_kwargs_and_continue_final_message_reach_the_template(hermes_tokenizer):
    tok = hermes_tokenizer
    messages = [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "The colour is"}]

    async def calls(serving):
        def ids(**fields):
            return serving.tokenize({"messages": messages[:1], **fields})["tokens"]

        thinking_off = ids(chat_template_kwargs={"enable_thinking": False})
        continued = serving.tokenize({"messages": messages, "add_generation_prompt": False,
                                      "continue_final_message": True})["tokens"]
        with pytest.raises(InvalidRequestError) as e:
            ids(chat_template_kwargs={"tokenize": True})
        body = await serving.completion(chat_body(messages=messages, add_generation_prompt=False,
                                                  continue_final_message=True, echo=True, max_tokens=4), chat=True)
        return ids(), thinking_off, continued, e.value, body

    plain, thinking_off, continued, err, body = run(tok, calls)

    def want(msgs, **kw):
        return tok.encode(tok.apply_chat_template(msgs, tokenize=False, **kw), add_special_tokens=False)

    assert thinking_off == want(messages[:1], add_generation_prompt=True, enable_thinking=False) != plain
    assert tok.decode(thinking_off).endswith("<think></think>")
    text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("The colour is") and continued == tok.encode(text, add_special_tokens=False)
    assert err.param == "chat_template_kwargs" and "tokenize" in err.message
    assert body["usage"]["prompt_tokens"] == len(continued)  # the chat completion's prompt is the continued text
    assert body["choices"][0]["message"]["content"].startswith("The colour is")  # echo: the assistant's message
