"""OpenAI ⇄ engine conversions: sampling params, response bodies, stream chunks, error bodies."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import replace

from pydantic import ValidationError

from raytp.api.protocol import ChatCompletionRequest, CompletionRequest
from raytp.engine.protocol import RequestOutput
from raytp.errors import InvalidRequestError, check_token_ids
from raytp.messages import SamplingParams

# The lowest logprob a response reports (vLLM's floor). A token masked out (structured output, allowed_token_ids,
# top-k / top-p among the alternatives) has logprob -inf, which JSON cannot carry: Starlette refuses to encode
# it (a 500) and json.dumps writes -Infinity, which clients fail to parse.
LOGPROB_FLOOR = -9999.0


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def invalid_request(errors: list[dict]) -> InvalidRequestError:
    """First pydantic error → one OpenAI-style 400 naming the parameter, its message and, for pydantic's own
    checks, its error type (``seed: Input should be less than or equal to 9223372036854775807
    [type=less_than_equal]``); the type is the error's ``code`` too."""
    err = errors[0] if errors else {}
    param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
    msg = err.get("msg", "invalid request")
    kind = err.get("type")
    # vLLM's message quotes pydantic's error whole, and clients match the bound's name in it (less_than_equal,
    # greater_than_equal). Our validators' own ValueErrors (value_error) already say what to fix.
    if kind and kind != "value_error":
        msg = f"{msg} [type={kind}]"
    return InvalidRequestError(f"{param}: {msg}" if param else msg, param=param, code=kind)


def parse(model_cls, body):
    """Validate a dict (or pass through an instance) as ``model_cls``; raise ``InvalidRequestError``."""
    if isinstance(body, model_cls):
        return body
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise invalid_request(e.errors()) from None


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, vocab_size: int,
                    grammar: str | None = None) -> SamplingParams:
    """The engine's params for ``req`` (choice 0), its output constrained by ``grammar`` if given;
    ``InvalidRequestError`` for token ids outside the vocabulary or a min_tokens above max_tokens."""
    bias = tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items())
    stop_ids = tuple(req.stop_token_ids or ())
    allowed = tuple(sorted(set(req.allowed_token_ids or ())))
    check_token_ids([t for t, _ in bias], vocab_size, "logit_bias")
    check_token_ids(stop_ids, vocab_size, "stop_token_ids")
    check_token_ids(allowed, vocab_size, "allowed_token_ids")
    if req.min_tokens > max_tokens:
        raise InvalidRequestError(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})",
                                  param="min_tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        seed=req.seed,
        stop=tuple(req.stop or ()),
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=bias,
        min_tokens=req.min_tokens,
        stop_token_ids=stop_ids,
        allowed_token_ids=allowed,
        logprobs=req.num_logprobs if isinstance(req, ChatCompletionRequest) else req.logprobs,
        grammar=grammar,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )


def for_choice(params: SamplingParams, j: int) -> SamplingParams:
    """Choice j of n: its own seed stream (seed + j), so choices differ and each is reproducible."""
    return params if j == 0 or params.seed is None else replace(params, seed=params.seed + j)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice_body(index: int, text: str | None, logprobs: dict | None, *, chat: bool,
                finish_reason: str | None, tool_calls: list[dict] | None = None) -> dict:
    if chat:
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def finite_logprob(lp: float | None) -> float | None:
    """``lp`` as a response may carry it: -inf and NaN become ``LOGPROB_FLOOR``, as do values below it; None
    (no logprob, e.g. an echoed first prompt token) stays None. Every logprob entry a body holds is built
    through this."""
    if lp is None:
        return None
    return LOGPROB_FLOOR if math.isnan(lp) else max(float(lp), LOGPROB_FLOOR)


def logprobs_body(token_text, token_ids: list[int], entries: list, chat: bool, text_offset: int = 0) -> dict | None:
    """OpenAI's logprobs object for these tokens: completions' ``tokens`` / ``token_logprobs`` / ``top_logprobs``
    / ``text_offset`` (from ``text_offset`` on), or chat's ``content`` list. ``token_text(id)``: a token's text."""
    if not entries:
        return None
    entries = [e if e is not None else (None, (), None) for e in entries]  # echo: the first prompt token has none
    if chat:
        def item(t, lp):
            text = token_text(t)
            return {"token": text, "logprob": finite_logprob(lp), "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(t, e[0]), "top_logprobs": [item(a, lp) for a, lp in e[1]]}
                            for t, e in zip(token_ids, entries)]}
    texts = [token_text(t) for t in token_ids]
    offsets = []
    for text in texts:
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": texts, "token_logprobs": [finite_logprob(e[0]) for e in entries],
            "top_logprobs": [_top_with_chosen(token_text, t, e) for t, e in zip(token_ids, entries)],
            "text_offset": offsets}


def _top_with_chosen(token_text, chosen: int, entry) -> dict | None:
    """Completions' top_logprobs of one token: the k alternatives and, if not among them, the chosen token itself
    (OpenAI documents up to k + 1 entries; vLLM does the same), so logprobs 0 gives exactly the chosen one."""
    lp, top = entry[0], entry[1]
    if lp is None:
        return None
    out = {token_text(a): finite_logprob(a_lp) for a, a_lp in top}
    if all(a != chosen for a, _ in top):
        out[token_text(chosen)] = finite_logprob(lp)
    return out


def prompt_logprobs_body(token_text, prompt_ids, entries: list, k: int) -> list:
    """vLLM's ``prompt_logprobs``: null for the first prompt token, then per token a dict of token id (a string
    key, as JSON has) → ``{"logprob", "rank", "decoded_token"}`` holding the prompt token itself and its ``k``
    most likely alternatives (k or k + 1 entries). ``entries``: the engine's, one per prompt token after the
    first."""
    out: list = [None]
    for token, entry in zip(list(prompt_ids)[1:], entries):
        lp, top, rank = entry
        item = {str(token): {"logprob": finite_logprob(lp), "rank": rank, "decoded_token": token_text(token)}}
        for r, (alt, alt_lp) in enumerate(top[:k], start=1):
            item.setdefault(str(alt), {"logprob": finite_logprob(alt_lp), "rank": r,
                                       "decoded_token": token_text(alt)})
        out.append(item)
    return out


def merge_logprobs(first: dict, then: dict | None) -> dict:
    """Completions logprobs of the prompt (echo) followed by those of the output."""
    return first if then is None else {k: first[k] + then[k] for k in first}


def completion_body(request_id: str, model: str, choices: list[dict], usage_: dict, chat: bool) -> dict:
    return {**_envelope(request_id, model, "chat.completion" if chat else "text_completion", choices),
            "usage": usage_}


def stream_chunk(request_id: str, model: str, index: int, out: RequestOutput, chat: bool, *,
                 first: bool = False, logprobs: dict | None = None) -> dict:
    """One SSE chunk carrying choice ``index``'s new text (a choice's first chat chunk also carries the role)."""
    if chat:
        delta = {"role": "assistant", "content": out.text} if first else {"content": out.text}
        choice = {"index": index, "delta": delta, "finish_reason": out.finish_reason, "logprobs": logprobs}
    else:
        choice = {"index": index, "text": out.text, "finish_reason": out.finish_reason, "logprobs": logprobs}
    return _chunk(request_id, model, chat, [choice])


def delta_chunk(request_id: str, model: str, index: int, delta: dict, finish_reason: str | None) -> dict:
    """A chat chunk with a given delta (tool calls are streamed this way)."""
    return _chunk(request_id, model, True, [{"index": index, "delta": delta, "finish_reason": finish_reason,
                                            "logprobs": None}])


def usage_chunk(request_id: str, model: str, usage_: dict, chat: bool) -> dict:
    """The final chunk of ``stream_options.include_usage``: no choices, the request's usage."""
    chunk = _chunk(request_id, model, chat, [])
    chunk["usage"] = usage_
    return chunk


def _chunk(request_id: str, model: str, chat: bool, choices: list) -> dict:
    return _envelope(request_id, model, "chat.completion.chunk" if chat else "text_completion", choices)


def _envelope(request_id: str, model: str, obj: str, choices: list) -> dict:
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
