"""OpenAI ⇄ engine conversions: sampling params, response bodies, stream chunks, error bodies."""

from __future__ import annotations

import time
import uuid

from pydantic import ValidationError

from raytp.api.protocol import ChatCompletionRequest, CompletionRequest
from raytp.engine.protocol import RequestOutput
from raytp.errors import InvalidRequestError
from raytp.messages import SamplingParams


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def invalid_request(errors: list[dict]) -> InvalidRequestError:
    """First pydantic error → one OpenAI-style 400 naming the parameter."""
    err = errors[0] if errors else {}
    param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
    msg = err.get("msg", "invalid request")
    return InvalidRequestError(f"{param}: {msg}" if param else msg, param=param, code=err.get("type"))


def parse(model_cls, body):
    """Validate a dict (or pass through an instance) as ``model_cls``; raise ``InvalidRequestError``."""
    if isinstance(body, model_cls):
        return body
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise invalid_request(e.errors()) from None


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=max(req.top_k, 0),
        seed=req.seed,
        stop=tuple(req.stop or ()),
        ignore_eos=req.ignore_eos,
    )


def usage(out: RequestOutput) -> dict:
    return {
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": out.num_output_tokens,
        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
    }


def completion_body(request_id: str, model: str, text: str, last: RequestOutput, chat: bool) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": None}
    return {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(last),
    }


def stream_chunk(request_id: str, model: str, out: RequestOutput, chat: bool, *, first: bool = False) -> dict:
    """One SSE chunk carrying ``out``'s new text (the first chat chunk also carries the role)."""
    if chat:
        delta = {"role": "assistant", "content": out.text} if first else {"content": out.text}
        choice = {"index": 0, "delta": delta, "finish_reason": out.finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}
    return _chunk(request_id, model, chat, [choice])


def usage_chunk(request_id: str, model: str, last: RequestOutput, chat: bool) -> dict:
    """The final chunk of ``stream_options.include_usage``: no choices, the request's usage."""
    chunk = _chunk(request_id, model, chat, [])
    chunk["usage"] = usage(last)
    return chunk


def _chunk(request_id: str, model: str, chat: bool, choices: list) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
