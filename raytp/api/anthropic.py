"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``, as vLLM serves them) as a
translation over raytp's chat path: request models, and pure functions from an Anthropic request to a
``ChatCompletionRequest`` (or a ``TokenizeRequest`` for count_tokens) and from the chat answer, or its stream
chunks, back to Anthropic's message body or stream events. Templating, tool calls, stop strings and sampling are
the chat path's (``raytp.serve.openai_serving``); nothing here touches the engine.

The mapping: ``system`` (a string or text blocks) is a leading system message; a user turn's ``tool_result``
blocks are ``tool`` messages (before the turn's text, as Anthropic orders them); an assistant turn's ``tool_use``
blocks are its ``tool_calls``; a final assistant turn is a prefill the output continues (Anthropic's meaning;
the chat's ``continue_final_message``). ``tool_choice`` auto / any / tool / none is auto / required / a named
function / none; ``stop_sequences`` are stop strings, asked back in the output
(``include_stop_str_in_output``) so the answer can name the one that matched (``stop_sequence``), then cut off.
Only text, ``tool_use`` and ``tool_result`` blocks are accepted (text-only models); unknown fields (``thinking``,
``cache_control``, ...) are ignored and logged as in the OpenAI routes (``raytp.api.lenient``); ``metadata``
only describes the caller. Errors are Anthropic's body ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from raytp.api.lenient import LenientModel as _Lenient
from raytp.api.openai import parse
from raytp.api.protocol import ChatCompletionRequest, TokenizeRequest
from raytp.errors import RaytpError

ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
MAX_STOP_SEQUENCES = 4  # the chat path's bound on stop strings
_BLOCK_TYPES = ("text", "tool_use", "tool_result")


# ---- request models ----------------------------------------------------------------------------------------------
class TextBlockParam(_Lenient):
    _where: ClassVar[str] = "messages.content"
    type: Literal["text"]
    text: str


class ToolUseBlockParam(_Lenient):
    _where: ClassVar[str] = "messages.content"
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict = Field(default_factory=dict, description="The call's arguments.")


class ToolResultBlockParam(_Lenient):
    _where: ClassVar[str] = "messages.content"
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlockParam] = ""
    is_error: bool = Field(False, description="Accepted; the chat template sees only the content.")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(b.text for b in self.content)


BlockParam = Annotated[TextBlockParam | ToolUseBlockParam | ToolResultBlockParam, Field(discriminator="type")]


class MessageParam(_Lenient):
    _where: ClassVar[str] = "messages"
    role: Literal["user", "assistant"]
    content: str | list[BlockParam]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, v):
        for block in v if isinstance(v, list) else ():
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in _BLOCK_TYPES:
                raise ValueError(f"only text, tool_use and tool_result blocks are supported (got {kind!r}): this "
                                 "server serves text-only models")
        return v

    @model_validator(mode="after")
    def _blocks_in_their_turn(self):
        kinds = {b.type for b in self.content} if isinstance(self.content, list) else set()
        if self.role == "user" and "tool_use" in kinds:
            raise ValueError("tool_use blocks belong in assistant turns")
        if self.role == "assistant" and "tool_result" in kinds:
            raise ValueError("tool_result blocks belong in user turns")
        return self


class ToolParam(_Lenient):
    _where: ClassVar[str] = "tools"
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict = Field(description="A JSON schema of the tool's input.")


class ToolChoiceParam(_Lenient):
    _where: ClassVar[str] = "tool_choice"
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description="The tool to call, with type tool.")
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _name_with_tool(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name is required with type tool, and only with it")
        return self


class _Conversation(_Lenient):
    """What both routes template: the system prompt, the turns, the tools."""

    model: str = Field(description="The served model name (see GET /v1/models); empty: the served model.")
    system: str | list[TextBlockParam] | None = None
    messages: list[MessageParam] = Field(min_length=1)
    tools: list[ToolParam] | None = Field(None, max_length=128)
    tool_choice: ToolChoiceParam | None = Field(None, description="Default: auto when tools are given (it needs the "
                                           "server's tool_call_parser); any / tool constrain the output to a call.")

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self):
        names = [t.name for t in self.tools or ()]
        choice = self.tool_choice
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not in tools")
        if choice is not None and choice.type in ("auto", "any") and not names:
            raise ValueError(f"tool_choice {choice.type!r} needs tools")
        return self


class MessagesRequest(_Conversation):
    """``POST /v1/messages``."""

    max_tokens: int = Field(ge=1, description="Most tokens to generate (required).")
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Anthropic's range is 0-1; up to 2 is "
                                      "accepted, as in chat completions. 0 = greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="0 = no top-k cut.")
    stream: bool = False
    metadata: dict | None = Field(None, description="Describes the caller; accepted and ignored.")


class CountTokensRequest(_Conversation):
    """``POST /v1/messages/count_tokens``."""


# ---- requests → the chat path --------------------------------------------------------------------------------
def chat_request(req: MessagesRequest) -> ChatCompletionRequest:
    """The chat completion that answers ``req``. Raises ``InvalidRequestError`` for what the chat path refuses."""
    body = {"model": req.model, "messages": _chat_messages(req), "max_tokens": req.max_tokens,
            "stream": req.stream, **_template_options(req), **_tools(req)}
    body.update({k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k))
                 if v is not None})
    if req.stop_sequences:
        body.update(stop=req.stop_sequences, include_stop_str_in_output=True)
    if req.stream:  # message_start carries the prompt's tokens, message_delta the output's
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return parse(ChatCompletionRequest, body)


def tokenize_request(req: CountTokensRequest) -> TokenizeRequest:
    """The /tokenize request whose count is what ``req`` would send the model (templated, with its tools)."""
    body = {"model": req.model or None, "messages": _chat_messages(req), **_template_options(req)}
    if req.tools:
        body["tools"] = _tools(req)["tools"]
    return parse(TokenizeRequest, body)


def _chat_messages(req: _Conversation) -> list[dict]:
    out = []
    if req.system:
        text = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
        out.append({"role": "system", "content": text})
    for m in req.messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text = "".join(b.text for b in m.content if b.type == "text")
        if m.role == "assistant":
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                     for b in m.content if b.type == "tool_use"]
            out.append({"role": "assistant", "content": text or (None if calls else ""),
                        **({"tool_calls": calls} if calls else {})})
            continue
        results = [b for b in m.content if b.type == "tool_result"]
        out += [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text} for b in results]
        if text or not results:
            out.append({"role": "user", "content": text})
    return out


def _template_options(req: _Conversation) -> dict:
    """A final assistant turn is a prefill: the output continues it (no new assistant header)."""
    last = req.messages[-1]
    prefill = last.role == "assistant" and (isinstance(last.content, str)
                                            or all(b.type == "text" for b in last.content))
    return {"add_generation_prompt": False, "continue_final_message": True} if prefill else {}


def _tools(req: _Conversation) -> dict:
    if not req.tools:
        return {}
    out = {"tools": [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                         "parameters": t.input_schema}} for t in req.tools]}
    choice = req.tool_choice
    if choice is not None:
        out["tool_choice"] = ({"type": "function", "function": {"name": choice.name}} if choice.type == "tool"
                              else {"auto": "auto", "any": "required", "none": "none"}[choice.type])
        out["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return out


# ---- chat answers → Anthropic ------------------------------------------------------------------------------------
def message_id(chat_id: str) -> str:
    """``msg_<request id>``: the chat's id (``chatcmpl-<X-Request-Id>``) keeps following the request."""
    return "msg_" + chat_id.removeprefix("chatcmpl-")


def split_stop(text: str, stop_sequences: list[str] | None) -> tuple[str, str | None]:
    """(``text`` without the stop sequence it ends with, that sequence) or (``text``, None). The longest wins:
    the engine stops at the match that starts first."""
    ends = [s for s in stop_sequences or () if s and text.endswith(s)]
    if not ends:
        return text, None
    stop = max(ends, key=len)
    return text[:-len(stop)], stop


def stop_reason(finish_reason: str | None, tool_used: bool, stop_sequence: str | None) -> str:
    if tool_used:
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def _tool_use(call: dict) -> dict:
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"] or "{}")}


def message_body(chat: dict, stop_sequences: list[str] | None) -> dict:
    """The Message body for a (non-streamed, n = 1) chat completion body. An empty answer is one empty text block, as
    Anthropic's (clients read ``content[0]``)."""
    choice = chat["choices"][0]
    finish, calls = choice["finish_reason"], choice["message"].get("tool_calls") or []
    text, stop = split_stop(choice["message"]["content"] or "", stop_sequences if finish == "stop" else None)
    content = ([{"type": "text", "text": text}] if text else []) + [_tool_use(c) for c in calls]
    return {"id": message_id(chat["id"]), "type": "message", "role": "assistant", "model": chat["model"],
            "content": content or [{"type": "text", "text": ""}],
            "stop_reason": stop_reason(finish, bool(calls), stop), "stop_sequence": stop,
            "usage": {"input_tokens": chat["usage"]["prompt_tokens"],
                      "output_tokens": chat["usage"]["completion_tokens"]}}


def _held_back(text: str, stop_sequences: list[str]) -> int:
    """Length of the longest end of ``text`` that is (the start of) a stop sequence: text a stop sequence may
    still turn out to be, so a stream must not send it yet."""
    best = 0
    for s in stop_sequences:
        for k in range(min(len(s), len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class MessageStream:
    """Chat completion stream chunks (n = 1, usage in every chunk) → Anthropic's events: ``message_start``, then
    per content block ``content_block_start`` / ``content_block_delta`` (``text_delta``, ``input_json_delta``) /
    ``content_block_stop``, then ``message_delta`` (stop reason, usage) and ``message_stop``. Text that may be the
    start of a stop sequence is held back until it is known not to be, so a matched stop sequence never reaches
    the client (the chat stream sends it back, for ``stop_sequence``)."""

    def __init__(self, model: str, stop_sequences: list[str] | None):
        self.model = model
        self.stops = [s for s in stop_sequences or () if s]
        self._id = "msg_"
        self._started = False
        self._index = -1  # the current content block's index
        self._open: str | None = None  # the open block's type
        self._held = ""  # text not sent yet (it may be a stop sequence)
        self._finish: str | None = None
        self._tool_used = False
        self._usage = {"input_tokens": 0, "output_tokens": 0}

    def feed(self, chunk: dict) -> list[dict]:
        """The events one chat chunk makes."""
        events = []
        if chunk.get("usage"):
            self._usage = {"input_tokens": chunk["usage"]["prompt_tokens"],
                           "output_tokens": chunk["usage"]["completion_tokens"]}
        if not self._started:
            self._id, self.model = message_id(chunk["id"]), chunk.get("model") or self.model
            events.append(self._message_start())
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or ():
                events += self._flush() + self._block({"type": "tool_use", "id": call["id"],
                                                       "name": call["function"]["name"], "input": {}})
                self._tool_used = True
                if call["function"]["arguments"]:
                    events.append(self._delta({"type": "input_json_delta",
                                               "partial_json": call["function"]["arguments"]}))
            self._finish = choice["finish_reason"] or self._finish
        return events

    def finish(self) -> list[dict]:
        """The events after the last chunk: the held-back text (less a matched stop sequence), the last block's
        end, the stop reason and usage."""
        events = [] if self._started else [self._message_start()]
        text, stop = split_stop(self._held, self.stops if self._finish == "stop" else None)
        self._held = ""
        if text:
            events += self._text_now(text)
        if self._index < 0:  # no block at all: one empty text block, as in the non-streamed body
            events += self._block({"type": "text", "text": ""})
        if self._open:
            events.append({"type": "content_block_stop", "index": self._index})
        events.append({"type": "message_delta",
                       "delta": {"stop_reason": stop_reason(self._finish, self._tool_used, stop),
                                 "stop_sequence": stop},
                       "usage": dict(self._usage)})
        return events + [{"type": "message_stop"}]

    def _message_start(self) -> dict:
        self._started = True
        return {"type": "message_start", "message": {
            "id": self._id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self._usage["input_tokens"], "output_tokens": 0}}}

    def _text(self, piece: str) -> list[dict]:
        text = self._held + piece
        keep = _held_back(text, self.stops)
        self._held = text[len(text) - keep:]
        return self._text_now(text[:len(text) - keep]) if keep < len(text) else []

    def _text_now(self, text: str) -> list[dict]:
        events = [] if self._open == "text" else self._block({"type": "text", "text": ""})
        return events + [self._delta({"type": "text_delta", "text": text})]

    def _flush(self) -> list[dict]:
        """Held-back text before a tool call: a stop sequence only ends the whole output, so it is text."""
        text, self._held = self._held, ""
        return self._text_now(text) if text else []

    def _block(self, block: dict) -> list[dict]:
        events = [{"type": "content_block_stop", "index": self._index}] if self._open else []
        self._index += 1
        self._open = block["type"]
        return events + [{"type": "content_block_start", "index": self._index, "content_block": block}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self._index, "delta": delta}


# ---- errors --------------------------------------------------------------------------------------------------
# Anthropic's error types by the HTTP status raytp answers with (the OpenAI routes' statuses, unchanged)
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_body(err: RaytpError) -> dict:
    """Anthropic's error body for a typed raytp error (its type from the status: a model that is not served is
    a 404 not_found_error, a replica loading or dead a 503 overloaded_error; other 4xx are invalid requests)."""
    status = err.status_code
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def is_messages_path(path: str) -> bool:
    """Whether an HTTP path is one of these routes (under any route prefix), which answer errors in this shape."""
    return path.rstrip("/").endswith(ROUTES)


async def stream_events(batches, stream: MessageStream, to_error):
    """Lists of Anthropic events for ``batches`` (a chat stream's lists of chunks; it has ``cancel()``). An error
    before the first list is raised, so it can still be a plain HTTP error; a later one ends the stream with an
    ``error`` event (``to_error(exception) -> RaytpError``). Closing this cancels ``batches``, which aborts the
    request in the engine."""
    sent = False
    try:
        async for batch in batches:
            events = [e for chunk in batch for e in stream.feed(chunk)]
            if events:
                sent = True
                yield events
        yield stream.finish()
    except Exception as e:  # noqa: BLE001 - mid-stream: the client gets an error event, not a broken stream
        if not sent:
            raise
        yield [error_body(to_error(e))]
    finally:
        batches.cancel()  # no-op when finished
