"""OpenAI request schemas, validated with pydantic at the ingress (and again for handle callers).

Fields raytp cannot honour are rejected with a message, never silently ignored:
unknown fields, ``n`` > 1, ``logprobs``, non-zero penalties.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Served model name (see GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 = no top-k cut.")
    stop: str | list[str] | None = Field(
        None, validate_default=True, description="Up to 4 strings that end the completion (not included)."
    )
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, description="Only 1 is supported.")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = Field(False, description="Extension (as in vLLM): keep generating past EOS.")
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _only_one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("penalties are not supported; omit the field or send 0")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        return stops


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(description="Text, or token ids.")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (OpenAI's default: 16).")
    echo: Literal[False] = False
    logprobs: None = Field(None, description="Not supported.")
    suffix: None = Field(None, description="Not supported.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens.")
    logprobs: Literal[False] | None = Field(None, description="Not supported.")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


_Sampling.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
