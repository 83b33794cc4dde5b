"""OpenAI request schemas, validated with pydantic at the ingress (and again for handle callers).

Parsing is lenient where vLLM's is: an unknown field, top-level or inside a message or any nested object, is
accepted and ignored, and its name (never its value) is logged once per process at INFO (``raytp.api.lenient``),
so a client that adds one field for another server still works. Known fields stay strict: wrong types and
out-of-range values are a 400 that names the field. Fields raytp knows but cannot honour are refused with a
message that says why, never silently ignored (``best_of`` > 1, ``suffix``, the deprecated ``functions``, ...).
Fields that only describe the caller (``user``, ``metadata``, ``store``, ``service_tier``, ``prompt_cache_key``,
``safety_identifier``) are accepted and ignored by design: they change no output. vLLM's extensions (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``allowed_token_ids``, ``ignore_eos``,
``prompt_logprobs``, ``return_tokens_as_token_ids``, ``skip_special_tokens``, ``include_stop_str_in_output``,
``truncate_prompt_tokens``, ``add_special_tokens``, ``structured_outputs`` and the older ``guided_*``,
``use_beam_search`` with ``length_penalty``, in chat ``echo``, ``add_generation_prompt``,
``continue_final_message``, ``chat_template_kwargs``) are accepted with vLLM's meaning. A message's ``role`` is
any string: which roles exist is the chat template's business.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from raytp.api.lenient import LenientModel as _Lenient
from raytp.api.lenient import refuse_if_set as _refuse_set


class _Sampling(_Lenient):
    model: str | None = Field(None, description="Served model name (see GET /v1/models). Absent or empty: the "
                              "served model, as vLLM answers.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 = no top-k cut.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Extension (vLLM): after temperature, drop tokens less "
                         "likely than min_p times the most likely one.")
    stop: str | list[str] | None = Field(
        None, validate_default=True, description="Up to 4 strings that end the completion (not included).")
    # le, not lt: clients parse the bound's name from the error (less_than_equal / greater_than_equal), as vLLM's
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1,
                             description="Choice j of a request samples with seed + j.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=64, description="Choices per prompt; they share the prompt's KV blocks.")
    best_of: int | None = Field(None, description="Only 1 (= n=1): best_of > 1 is not supported (vLLM removed it).")
    use_beam_search: bool = Field(False, description="Extension (vLLM): beam search of width n; the n choices "
                                  "are the n best beams (raytp.serve.beam_search). Streamed: each choice whole, "
                                  "once the search has ended.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="Extension (vLLM): >1 discourages any "
                                      "token of the prompt or output so far.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) → bias in [-100, 100].")
    allowed_token_ids: list[int] | None = Field(None, min_length=1, description="Extension (vLLM): only these "
                                                "token ids may be generated.")
    min_tokens: int = Field(0, ge=0, description="Extension (vLLM): no EOS, stop token or stop string before this "
                            "many tokens.")
    stop_token_ids: list[int] | None = Field(None, description="Extension (vLLM): token ids that end the completion.")
    include_stop_str_in_output: bool = Field(False, description="Extension (vLLM): the stop string (or stop "
                                             "token's text) that ended the output is part of it.")
    ignore_eos: bool = Field(False, description="Extension (as in vLLM): keep generating past EOS.")
    skip_special_tokens: bool = Field(True, description="Extension (vLLM): false keeps special tokens' text in the "
                                      "output.")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="Extension (vLLM): log-probabilities of "
                                        "every prompt token and of this many alternatives (response field "
                                        "prompt_logprobs; not with stream).")
    return_tokens_as_token_ids: bool = Field(False, description="Extension (vLLM): tokens in logprobs as "
                                             "'token_id:N' (for tokens whose text is not valid UTF-8 alone).")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="Extension (vLLM): keep only the last N "
                                               "prompt tokens (-1: max_model_len).")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema: the output "
                                                   "is constrained to it token by token (compact JSON).")
    structured_outputs: StructuredOutputs | None = Field(None, description="Extension (vLLM): one of json, regex, "
                                                         "choice, grammar (Lark or GBNF), json_object.")
    guided_json: str | dict | None = Field(None, description="Extension (older vLLM): = structured_outputs.json.")
    guided_regex: str | None = Field(None, description="Extension (older vLLM): = structured_outputs.regex.")
    guided_choice: list[str] | None = Field(None, min_length=1, description="Extension (older vLLM): = "
                                            "structured_outputs.choice.")
    guided_grammar: str | None = Field(None, description="Extension (older vLLM): = structured_outputs.grammar.")
    length_penalty: float = Field(1.0, description="Extension (vLLM): with use_beam_search, beams rank by "
                                  "cumulative logprob / output_length ** length_penalty (Hugging Face's score).")
    # vLLM fields raytp cannot honour: named so they are refused, not ignored as unknown
    bad_words: list[str] | None = Field(None, description="Not supported.")
    logits_processors: list | None = Field(None, description="Not supported (no code from requests).")
    prompt_embeds: Any = Field(None, description="Not supported.")
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
            raise ValueError("best_of > 1 is not supported (vLLM removed it too): it would generate best_of "
                             "sequences per choice and return the most likely; use n and pick with logprobs")
        return v

    @field_validator("length_penalty")
    @classmethod
    def _length_penalty_needs_beams(cls, v: float, info: ValidationInfo) -> float:
        if v != 1.0 and not info.data.get("use_beam_search"):  # it would change nothing: never silently ignored
            raise ValueError("length_penalty only applies with use_beam_search: true")
        return v

    @field_validator("bad_words", "logits_processors", "prompt_embeds")
    @classmethod
    def _not_supported(cls, v, info: ValidationInfo):
        return _refuse_set(v, f"raytp does not implement {info.field_name}")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias of token {key} must be in [-100, 100]")
        return v

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_not_streamed(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and info.data.get("stream"):  # vLLM's rule and words: 0 with stream passes (and returns nothing)
            raise ValueError("`prompt_logprobs` are not available when `stream=True`.")
        return v

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("must be -1 (max_model_len) or at least 1")
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

    def structured_constraints(self) -> list[tuple[str, str, object]]:
        """Every output constraint the request sets, as (param, kind, spec); kind is one of json, json_object,
        regex, choice, grammar (``raytp.engine.structured.grammar_of``). More than one is the caller's error."""
        found = []
        if self.response_format is not None and self.response_format.type != "text":
            rf = self.response_format
            kind = "json_object" if rf.type == "json_object" else "json"
            found.append(("response_format", kind, (rf.json_schema.schema_ or {}) if rf.json_schema else None))
        if self.structured_outputs is not None:
            found += [(f"structured_outputs.{k}", k, v) for k, v in self.structured_outputs.set_kinds()]
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                found.append((f"guided_{kind}", kind, value))
        return found


class StructuredOutputs(_Lenient):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    _where: ClassVar[str] = "structured_outputs"
    json_: str | dict | None = Field(None, alias="json", description="A JSON schema (object or string).")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, description="A Lark grammar (llguidance's dialect) or GBNF.")
    json_object: bool | None = None
    structural_tag: Any = Field(None, description="Not supported.")

    @field_validator("structural_tag")
    @classmethod
    def _no_structural_tag(cls, v):
        return _refuse_set(v, "structural tags are not implemented; use json, regex, choice or grammar")

    def set_kinds(self) -> list[tuple[str, object]]:
        kinds = [("json", self.json_), ("regex", self.regex), ("choice", self.choice), ("grammar", self.grammar)]
        found = [(k, v) for k, v in kinds if v is not None]
        return found + ([("json_object", None)] if self.json_object else [])

    @model_validator(mode="after")
    def _exactly_one(self):
        if len(self.set_kinds()) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class JsonSchema(_Lenient):
    _where: ClassVar[str] = "response_format.json_schema"
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    _where: ClassVar[str] = "response_format"
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self


class StreamOptions(_Lenient):
    _where: ClassVar[str] = "stream_options"
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
    add_special_tokens: bool = Field(True, description="Extension (vLLM): text prompts get the tokenizer's "
                                     "special tokens (e.g. BOS).")
    suffix: None = Field(None, description="Not supported.")


class TextPart(_Lenient):
    _where: ClassVar[str] = "messages.content"
    type: Literal["text"] = Field(description="Only text parts: this server serves text-only models.")
    text: str


class FunctionCall(_Lenient):
    _where: ClassVar[str] = "tool_calls.function"
    name: str
    arguments: str = Field(description="The arguments as a JSON string, as OpenAI sends them.")


class ToolCall(_Lenient):
    _where: ClassVar[str] = "tool_calls"
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(_Lenient):
    _where: ClassVar[str] = "tools.function"
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(None, description="A JSON schema of the arguments.")
    strict: bool | None = None


class Tool(_Lenient):
    _where: ClassVar[str] = "tools"
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Lenient):
    _where: ClassVar[str] = "tool_choice"

    class _Name(_Lenient):
        _where: ClassVar[str] = "tool_choice.function"
        name: str

    type: Literal["function"]
    function: _Name


STANDARD_ROLES = ("system", "user", "assistant", "developer", "tool")


class ChatMessage(_Lenient):
    _where: ClassVar[str] = "messages"
    role: str = Field(min_length=1, description="Any role the chat template accepts (system, user, assistant, "
                      "developer, tool, or a template's own); the template refuses the others (400).")
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


class _ChatTemplateOptions(_Lenient):
    """vLLM's chat-template fields, shared by chat completions and /tokenize."""

    add_generation_prompt: bool = Field(True, description="Extension (vLLM): end the prompt with the template's "
                                        "assistant header (a new turn).")
    continue_final_message: bool = Field(False, description="Extension (vLLM): the prompt ends inside the final "
                                         "message, which the output continues (needs add_generation_prompt false).")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extension (vLLM): extra variables for "
                                                        "the chat template (e.g. enable_thinking).")

    @field_validator("continue_final_message")
    @classmethod
    def _one_way_to_end(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("add_generation_prompt"):  # vLLM's words
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return v


class ChatCompletionRequest(_Sampling, _ChatTemplateOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens.")
    logprobs: bool | None = Field(None, description="Log-probabilities of each output token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token; needs logprobs.")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto when tools are given. required / a named function constrain the output "
        "to the call's JSON (it always parses); auto parses the model's text with the tool_call_parser (configured, "
        "or detected from the chat template).")
    parallel_tool_calls: bool = True
    echo: bool = Field(False, description="Extension (vLLM): when the last message is the assistant's, its content "
                       "comes before the completion.")
    add_special_tokens: bool = Field(False, description="Extension (vLLM): add the tokenizer's special tokens on "
                                     "top of the template's (usually doubles BOS).")
    functions: list | None = Field(None, description="Deprecated by OpenAI; not supported: use tools.")
    function_call: Any = Field(None, description="Deprecated by OpenAI; not supported: use tool_choice.")
    chat_template: str | None = Field(None, description="Not supported: the model's own template is used.")
    documents: list | None = Field(None, description="Not supported.")

    @field_validator("functions", "function_call")
    @classmethod
    def _deprecated(cls, v, info: ValidationInfo):
        return _refuse_set(v, f"{info.field_name} is deprecated by OpenAI; use tools / tool_choice")

    @field_validator("chat_template", "documents")
    @classmethod
    def _template_inputs(cls, v, info: ValidationInfo):
        return _refuse_set(v, f"{info.field_name}: requests cannot change the model's chat template or "
                           "its inputs here")

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
        if self.tools and self.structured_constraints() and self.effective_tool_choice != "none":
            raise ValueError("response_format (or structured_outputs) and tool calls cannot constrain the same "
                             "output; use one")
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


class TokenizeRequest(_ChatTemplateOptions):
    """vLLM's ``POST /tokenize``: a prompt or chat messages → token ids (what a request would compute)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(None, description="vLLM's defaults when absent: true for a prompt, false "
                                            "for messages (the template has its own).")
    tools: list[Tool] | None = Field(None, max_length=128, description="With messages: the tools a chat request "
                                     "would send (templates that render tools count them), as vLLM's.")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.tools and self.messages is None:
            raise ValueError("tools go with messages, not with a prompt")
        return self


class DetokenizeRequest(_Lenient):
    """vLLM's ``POST /detokenize``: token ids → text."""

    model: str | None = None
    tokens: list[int]


_Sampling.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
