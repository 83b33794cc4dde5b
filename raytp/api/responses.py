"""OpenAI's Responses API (``POST /v1/responses``) as translations to and from chat completions.

A Responses request becomes one ``ChatCompletionRequest`` body (``to_chat_body``), so the chat path does the work
(templating, sampling, structured output, constrained and parsed tool calls); the chat answer becomes a Response
object (``response_object``) and a chat stream becomes the Responses event sequence (``StreamEvents``). Field
names, defaults and event shapes follow vLLM's implementation (``vllm/entrypoints/openai/responses``): the
Response echoes the request's settings, ``status`` is ``incomplete`` (``incomplete_details.reason``
``max_output_tokens``) when the token limit cut the output, and a stream ends with ``response.completed``
whatever the status, as vLLM's does.

A conversation is a list of items in the stored form ``input_items`` returns: messages ``{type: message, role,
content: str}``, ``function_call`` (call_id, name, arguments) and ``function_call_output`` (call_id, output).
``previous_response_id``'s items (its input and output) come before the request's own; its ``instructions`` do
not carry over (OpenAI's rule). Everything here is pure: the store and the HTTP side are in ``raytp.serve``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from raytp.api.lenient import LenientModel as _Lenient
from raytp.api.lenient import refuse_if_set as _refuse_set

_TEXT_PARTS = ("input_text", "output_text", "text")


class ContentPart(_Lenient):
    _where: ClassVar[str] = "input.content"
    type: str = Field(description="input_text or output_text (text-only models: no images or files).")
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v not in _TEXT_PARTS:
            raise ValueError(f"only input_text / output_text content parts are supported (got {v!r}): this server "
                             "serves text-only models")
        return v


class InputItem(_Lenient):
    """One input item: a message (``type`` may be absent), a ``function_call`` (the assistant's tool call), a
    ``function_call_output`` (its result), or a ``reasoning`` item sent back by a client (dropped: the chat
    template has no place for it)."""

    _where: ClassVar[str] = "input"
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None
    id: str | None = None
    status: str | None = None

    @model_validator(mode="after")
    def _fields_of_its_type(self):
        need = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                "function_call_output": ("call_id", "output"), "reasoning": ()}[self.type]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {', '.join(missing)}")
        return self


class FunctionTool(_Lenient):
    _where: ClassVar[str] = "tools"
    type: Literal["function"] = Field(description="Only function tools (no hosted tools on this server).")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(None, description="A JSON schema of the arguments.")
    strict: bool | None = None


class ToolChoiceFunction(_Lenient):
    _where: ClassVar[str] = "tool_choice"
    type: Literal["function"]
    name: str


class TextFormat(_Lenient):
    _where: ClassVar[str] = "text.format"
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs name and schema")
        return self


class TextConfig(_Lenient):
    _where: ClassVar[str] = "text"
    format: TextFormat | None = None


class ResponsesRequest(_Lenient):
    """``POST /v1/responses``. Unknown fields are ignored (as vLLM does); ``background`` is refused."""

    model: str | None = Field(None, description="Served model name; absent: the served model.")
    input: str | list[InputItem] = Field(description="A user message, or a list of items.")
    instructions: str | None = Field(None, description="A system message before the conversation (not carried "
                                     "over by previous_response_id).")
    max_output_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; a response cut by it "
                                          "is incomplete.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default 1.0; 0 = greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Default 1.0.")
    tools: list[FunctionTool] = Field(default_factory=list, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = Field(
        None, description="As in chat completions: default auto when tools are given (needs the server's "
        "tool_call_parser); required / a named function constrain the output to the call.")
    parallel_tool_calls: bool = True
    text: TextConfig | None = Field(None, description="text.format: text, json_object or json_schema (the output "
                                    "is constrained to it).")
    stream: bool = False
    store: bool = Field(True, description="Keep the response (bounded in count and age) for GET and "
                        "previous_response_id.")
    previous_response_id: str | None = Field(None, description="Continue this stored response's conversation.")
    metadata: dict[str, str] | None = None
    background: bool = Field(False, description="Not supported: responses run while the request is open.")
    # vLLM's sampling extensions, passed to the chat path (which validates their ranges)
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    # describe the caller, echoed, change no output
    user: str | None = None
    service_tier: str | None = None
    truncation: str | None = None

    @field_validator("background")
    @classmethod
    def _no_background(cls, v: bool) -> bool:
        return _refuse_set(v, "background responses: a response runs while its request is open (stream it for "
                           "early output)")

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("input is empty")
        return v


def input_items(req: ResponsesRequest) -> list[dict]:
    """The request's input as stored conversation items (text content joined; reasoning items dropped)."""
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    out = []
    for item in req.input:
        if item.type == "message":
            out.append({"type": "message", "role": item.role, "content": _text(item.content)})
        elif item.type == "function_call":
            out.append({"type": "function_call", "call_id": item.call_id, "name": item.name,
                        "arguments": item.arguments})
        elif item.type == "function_call_output":
            out.append({"type": "function_call_output", "call_id": item.call_id, "output": _text(item.output)})
    return out


def output_items(output: list[dict]) -> list[dict]:
    """A Response's output items in the stored form (what the next turn sees)."""
    items = []
    for item in output:
        if item["type"] == "message":
            items.append({"type": "message", "role": "assistant",
                          "content": "".join(p.get("text", "") for p in item["content"])})
        elif item["type"] == "function_call":
            items.append({"type": "function_call", "call_id": item["call_id"], "name": item["name"],
                          "arguments": item["arguments"]})
    return items


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content or ())


def chat_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """Chat messages of a conversation: instructions as a system message first; consecutive function calls join
    one assistant message's tool_calls (after its text, if the assistant said something first)."""
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions is not None else []
    for item in items:
        if item["type"] == "message":
            messages.append({"role": item["role"], "content": item["content"]})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last["content"] or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


_PASSED_ON = ("top_k", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty",
              "ignore_eos", "user", "metadata")


def to_chat_body(req: ResponsesRequest, history: list[dict]) -> dict:
    """The chat completion body that answers ``req`` after the conversation ``history`` (stored items). A stream
    asks for usage, which the Response carries."""
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req.instructions,
                                                                          history + input_items(req))}
    body.update({k: getattr(req, k) for k in _PASSED_ON if getattr(req, k) is not None})
    for ours, chat in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if getattr(req, ours) is not None:
            body[chat] = getattr(req, ours)
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
        body["parallel_tool_calls"] = req.parallel_tool_calls
    choice = req.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(
            include={"name", "schema_", "description", "strict"}, by_alias=True, exclude_none=True)}
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    content = [_output_text(text)] if text else []
    return {"id": item_id or f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "status": status,
            "content": content}


def function_call_item(call_id: str, name: str, arguments: str, status: str = "completed",
                       item_id: str | None = None) -> dict:
    return {"id": item_id or f"fc_{uuid.uuid4().hex}", "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def response_object(req: ResponsesRequest, response_id: str, created_at: int, model: str, status: str,
                    output: list[dict], usage_: dict | None) -> dict:
    """The Response: id, status, output and usage, and the request's settings echoed (vLLM's defaults for those
    it did not set)."""
    fmt = req.text.format if req.text and req.text.format else None
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
        "metadata": req.metadata, "model": model, "output": output, "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id, "reasoning": None, "service_tier": req.service_tier or "auto",
        "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": _tool_choice_echo(req), "tools": [t.model_dump(exclude_none=True) for t in req.tools],
        "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": req.truncation or "disabled",
        "usage": usage_, "user": req.user,
    }


def _tool_choice_echo(req: ResponsesRequest):
    if isinstance(req.tool_choice, ToolChoiceFunction):
        return req.tool_choice.model_dump()
    return req.tool_choice or "auto"


def from_chat(req: ResponsesRequest, response_id: str, created_at: int, chat: dict) -> dict:
    """The Response of a whole chat completion body (one choice)."""
    choice = chat["choices"][0]
    message, status = choice["message"], status_of(choice["finish_reason"])
    output = []
    if message.get("content") or not message.get("tool_calls"):
        output.append(message_item(message.get("content") or "", status))
    output += [function_call_item(c["id"], c["function"]["name"], c["function"]["arguments"])
               for c in message.get("tool_calls") or ()]
    u = chat["usage"]
    return response_object(req, response_id, created_at, chat["model"], status, output,
                           usage(u["prompt_tokens"], u["completion_tokens"]))


class StreamEvents:
    """Chat stream chunks in, Responses events out (dicts with ``type`` and ``sequence_number``). ``start()``:
    ``response.created`` and ``response.in_progress``; ``feed(chunk)``: the events of one chunk (a text delta
    opens the message item on its first piece; a tool call closes it and is sent whole: added, its arguments'
    delta and done, item done); ``finish()``: the open item's done events and ``response.completed``, whose
    ``response`` (``self.response``) is what gets stored; ``error(...)``: an ``error`` event."""

    def __init__(self, req: ResponsesRequest, response_id: str, model: str):
        self.req, self.response_id, self.model = req, response_id, model
        self.created_at = int(time.time())
        self.output: list[dict] = []
        self.response: dict | None = None
        self._seq = 0
        self._text: list[str] | None = None  # the open message's pieces, or None when no message is open
        self._msg_id = ""
        self._finish_reason: str | None = None
        self._usage = usage(0, 0)

    def _event(self, type_: str, **fields) -> dict:
        event = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _snapshot(self, status: str, usage_: dict | None) -> dict:
        return response_object(self.req, self.response_id, self.created_at, self.model, status, list(self.output),
                               usage_)

    def start(self) -> list[dict]:
        snapshot = self._snapshot("in_progress", None)
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def feed(self, chunk: dict) -> list[dict]:
        events: list[dict] = []
        if chunk.get("usage"):
            u = chunk["usage"]
            self._usage = usage(u["prompt_tokens"], u["completion_tokens"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or ():
                events += self._close_message() + self._tool_call(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return events

    def _text_delta(self, text: str) -> list[dict]:
        events = []
        where = {"output_index": len(self.output)}
        if self._text is None:
            self._text, self._msg_id = [], f"msg_{uuid.uuid4().hex}"
            events += [self._event("response.output_item.added", **where,
                                   item=message_item("", "in_progress", self._msg_id)),
                       self._event("response.content_part.added", **where, item_id=self._msg_id, content_index=0,
                                   part=_output_text(""))]
        self._text.append(text)
        return events + [self._event("response.output_text.delta", **where, item_id=self._msg_id, content_index=0,
                                     delta=text, logprobs=[])]

    def _close_message(self) -> list[dict]:
        if self._text is None:
            return []
        text, where = "".join(self._text), {"output_index": len(self.output), "item_id": self._msg_id}
        item = message_item(text, status_of(self._finish_reason), self._msg_id)
        self._text = None
        self.output.append(item)
        return [self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", **where, content_index=0, part=_output_text(text)),
                self._event("response.output_item.done", output_index=where["output_index"], item=item)]

    def _tool_call(self, call: dict) -> list[dict]:
        fn = call["function"]
        item = function_call_item(call["id"], fn["name"], fn["arguments"])
        where = {"output_index": len(self.output), "item_id": item["id"]}
        self.output.append(item)
        return [self._event("response.output_item.added", output_index=where["output_index"],
                            item={**item, "arguments": "", "status": "in_progress"}),
                self._event("response.function_call_arguments.delta", **where, delta=fn["arguments"]),
                self._event("response.function_call_arguments.done", **where, name=fn["name"],
                            arguments=fn["arguments"]),
                self._event("response.output_item.done", output_index=where["output_index"], item=item)]

    def finish(self) -> list[dict]:
        events = self._close_message()
        self.response = self._snapshot(status_of(self._finish_reason), self._usage)
        return events + [self._event("response.completed", response=self.response)]

    def error(self, message: str, code: str | None, param: str | None) -> dict:
        return self._event("error", message=message, code=code, param=param)
