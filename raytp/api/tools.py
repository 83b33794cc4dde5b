"""Tool calling in chat: what the model must output for each ``tool_choice``, and how its output becomes OpenAI
``tool_calls``.

* ``required`` and a named function use structured output (``raytp.engine.structured``), so the call always
  parses: a named function's output is exactly its arguments object; ``required``'s is a JSON array (one
  element unless ``parallel_tool_calls``) of ``{"name": <a tool>, "arguments": <its schema>}`` — vLLM's shape.
* ``auto`` leaves the output free and parses it with the model family's convention, chosen by the
  ``tool_call_parser`` config field, or, when that is not set, detected from the chat template
  (``detect_parser``). ``hermes`` (Qwen 2.5+, Hermes, many fine-tunes): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; text outside the tags is the content.
* ``none``: tools are only rendered by the template (if it renders them); nothing is parsed.
"""

from __future__ import annotations

import json
import re
import uuid

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def forced_schema(tools: list, choice, parallel: bool) -> dict:
    """The JSON schema the output must match for ``required`` or a named ``choice`` (a ``NamedToolChoice``)."""
    by_name = {t.function.name: (t.function.parameters or {"type": "object"}) for t in tools}
    if choice != "required":
        return by_name[choice.function.name]
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for name, params in by_name.items()]}
    schema = {"type": "array", "items": call, "minItems": 1}
    return schema if parallel else {**schema, "maxItems": 1}


def calls_from_forced(text: str, choice) -> list[tuple[str, str]]:
    """(name, arguments JSON) of each call in a forced output (``required`` or a named function)."""
    value = json.loads(text)
    if choice != "required":
        return [(choice.function.name, json.dumps(value))]
    return [(c["name"], json.dumps(c["arguments"])) for c in value]


def parse_hermes(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(content outside the tags or None, [(name, arguments JSON)]) of a hermes-style output. A tag whose body is
    not a JSON call is left in the content, as text."""
    calls, content, at = [], [], 0
    for m in _HERMES.finditer(text):
        try:
            body = json.loads(m.group(1))
            call = (body["name"], json.dumps(body.get("arguments", {})))
        except (ValueError, KeyError, TypeError):
            continue
        content.append(text[at:m.start()])
        at = m.end()
        calls.append(call)
    content.append(text[at:])
    rest = "".join(content).strip()
    return (rest or None) if calls else text, calls


def tool_calls_body(calls: list[tuple[str, str]]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": arguments}} for name, arguments in calls]


def extract(text: str, mode: str, choice, finish_reason: str | None) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, calls) of a finished chat output under tool ``mode`` ('forced' or 'auto'). A forced output cut
    short by max_tokens cannot parse: it comes back as content with its finish reason."""
    if mode == "auto":
        return parse_hermes(text)
    try:
        return None, calls_from_forced(text, choice)
    except (ValueError, KeyError, TypeError):
        return text, []


def stream_deltas(content: str | None, calls: list[dict]) -> list[dict]:
    """A buffered tool-call answer as OpenAI streams it: the role (with any content), then one delta per call."""
    deltas = [{"role": "assistant", "content": content}]
    deltas += [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]
    return deltas


def detect_parser(tokenizer) -> str | None:
    """The ``tool_call_parser`` a chat template implies, or None: ``hermes`` if the template renders an assistant's
    tool call inside ``<tool_call>`` tags (Qwen 2.5+, Hermes and their fine-tunes). The template is rendered with
    a probe conversation (a tool, a call to it); a template that refuses the probe is read as text instead."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        return None
    tool = {"type": "function", "function": {"name": "probe", "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    probe = [{"role": "user", "content": "probe"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "call_probe", "type": "function", "function": {"name": "probe", "arguments": {}}}]}]
    try:
        text = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False)
    except Exception:  # noqa: BLE001 - e.g. a template that raises on roles or order it does not expect
        text = template
    return "hermes" if "<tool_call>" in text else None
