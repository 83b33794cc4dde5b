"""OpenAI request schemas, validated with pydantic at the ingress (and again for handle callers).

Fields raytp cannot honour are rejected with a message, never silently ignored (unknown fields, best_of > 1,
beam search). Fields that only describe the caller (``user``, ``metadata``, ``store``,
``service_tier``, ``prompt_cache_key``, ``safety_identifier``) are accepted and ignored by design: they change no
output. The extensions vLLM has (``top_k``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``,
``ignore_eos``, ``stream_options.continuous_usage_stats``) are accepted with vLLM's meaning.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Served model name (see GET /v1/models). Absent or empty: the "
                              "served model, as vLLM answers.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 = no top-k cut.")
    stop: str | list[str] | None = Field(
        None, validate_default=True, description="Up to 4 strings that end the completion (not included)."
    )
    # le, not lt: clients parse the bound's name from the error (less_than_equal / greater_than_equal), as vLLM's
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1,
                             description="Choice j of a request samples with seed + j.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=64, description="Choices per prompt; they share the prompt's KV blocks.")
    best_of: int | None = Field(None, description="Only 1 (= n=1): best_of > 1 is not supported (vLLM removed it).")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="Extension (vLLM): >1 discourages any "
                                      "token of the prompt or output so far.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) → bias in [-100, 100].")
    min_tokens: int = Field(0, ge=0, description="Extension (vLLM): no EOS, stop token or stop string before this "
                            "many tokens.")
    stop_token_ids: list[int] | None = Field(None, description="Extension (vLLM): token ids that end the completion.")
    ignore_eos: bool = Field(False, description="Extension (as in vLLM): keep generating past EOS.")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema: the output "
                                                   "is constrained to it token by token (compact JSON).")
    # Describe the caller only; accepted and ignored by design (they change no output).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("best_of > 1 is not supported (vLLM removed it too); use n")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias of token {key} must be in [-100, 100]")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        return stops


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="Extension (vLLM): usage so far in every chunk, when "
                                         "include_usage is true.")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, token ids, or a list of either: one choice (n choices) per prompt, in order.")
    max_tokens: int | None = Field(16, ge=0, description="Most tokens to generate (OpenAI's default: 16); 0 only "
                                   "with echo (score the prompt, generate nothing).")
    echo: bool = Field(False, description="Return the prompt before the completion (and, with logprobs, the prompt "
                       "tokens' log-probabilities, the first one null).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Log-probabilities of each token and of this many "
                                 "alternatives (see docs: after temperature and penalties, before top-k/top-p).")
    suffix: None = Field(None, description="Not supported.")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="Only text parts: this server serves text-only models.")
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str = Field(description="The arguments as a JSON string, as OpenAI sends them.")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(None, description="A JSON schema of the arguments.")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class _Name(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str

    type: Literal["function"]
    function: _Name


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's calls (content may be null).")
    tool_call_id: str | None = Field(None, description="A tool turn: the call it answers.")

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only on an assistant turn with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported (got {kind!r}): this server serves "
                                     "text-only models")
        return v

    @property
    def text(self) -> str:
        """The content as one string (text parts joined, as chat templates expect)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict:
        """The message as chat templates take it: text content; tool calls with their arguments as objects (what
        Hugging Face's tool-use templates iterate over)."""
        out = {"role": self.role, "content": self.text}
        if self.name:
            out["name"] = self.name
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in self.tool_calls]
        return out


def _json_or_text(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens.")
    logprobs: bool | None = Field(None, description="Log-probabilities of each output token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token; needs logprobs.")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto when tools are given. required / a named function constrain the output "
        "to the call's JSON (it always parses); auto parses the model's text with the configured tool_call_parser.")
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self):
        names = [t.function.name for t in self.tools or ()]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice in ("auto", "required") and not names:
            raise ValueError(f"tool_choice {self.tool_choice!r} needs tools")
        if self.tools and self.response_format is not None and self.effective_tool_choice != "none":
            raise ValueError("response_format and tool calls cannot constrain the same output; use one")
        return self

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if not self.tools:
            return "none"
        return self.tool_choice if self.tool_choice is not None else "auto"

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a prompt or chat messages → token ids (what a request would compute)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize``: token ids → text."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


_Sampling.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
