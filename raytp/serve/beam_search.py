"""Beam search (vLLM's ``use_beam_search`` extension), in the serving layer over the ordinary engine.

The engine samples one token per sequence per step and keeps no beams, so beam search is built on top of it, as
vLLM v1 builds it: each step submits every live beam as a prompt (the request's prompt + the beam's tokens) for
one greedy token with the log-probabilities of its ``2 * n`` most likely next tokens (plus one per stop token),
extends each beam by those, and keeps the ``n`` most likely non-stop continuations by cumulative log-probability.
A continuation ending in EOS (unless ``ignore_eos``) or a ``stop_token_ids`` token is finished. The prefix cache
already holds the prompt and each beam's earlier tokens, so a step computes about one block per beam.

Finished beams and the beams still live after ``max_tokens`` steps are ranked by Hugging Face's score,
``cumulative logprob / output_length ** length_penalty`` (the output counts its stop token; vLLM divides by prompt +
output length instead, which ranks finished lengths differently); the ``n`` best are the request's ``n`` choices.
The search ends early only once no live beam can still reach the ``n`` best (a bound, not a heuristic), so the
result is the one running every step would give.

Scores are the model's log-probabilities at temperature 1, after ``logit_bias``, ``allowed_token_ids`` and
``repetition_penalty`` (which the step requests carry): ``temperature``, ``top_p``, ``top_k``, ``min_p`` and
``seed`` do not apply (beam search is deterministic; vLLM ignores them too). What a step request cannot carry is
refused by ``check_request``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from raytp.engine.protocol import EngineClient, RequestOutput
from raytp.errors import InvalidRequestError
from raytp.messages import SamplingParams, TokenLogprob
from raytp.serve.fanout import Choice, Fanout


def check_request(req, chat: bool) -> None:
    """``InvalidRequestError`` naming the first field a ``use_beam_search`` request sets that beam search cannot
    honour, and why."""
    refused = [
        ("presence_penalty", req.presence_penalty != 0.0, "it counts output tokens, which a beam's step request "
         "sends as prompt"),
        ("frequency_penalty", req.frequency_penalty != 0.0, "it counts output tokens, which a beam's step "
         "request sends as prompt"),
        ("stop", bool(req.stop), "beams end on EOS and stop_token_ids only; use stop_token_ids"),
        ("max_tokens", not chat and req.max_tokens == 0, "0 (score the prompt) generates no beams"),
    ]
    refused += [(param, True, "a constrained output is not searched") for param, _, _ in req.structured_constraints()]
    if chat and req.effective_tool_choice not in ("none", "auto"):
        refused.append(("tool_choice", True, "a forced tool call is a constrained output, which is not searched"))
    for param, is_set, why in refused:
        if is_set:
            raise InvalidRequestError(f"{param}: not supported with use_beam_search ({why})", param=param)


@dataclass(frozen=True)
class Beam:
    """One hypothesis: its output tokens (after the prompt), their summed log-probability, one ``TokenLogprob``
    per token when the request asked for logprobs, and ``"stop"`` once it ended on a stop token."""

    token_ids: tuple[int, ...] = ()
    cum_logprob: float = 0.0
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None

    def score(self, length_penalty: float) -> float:
        """Hugging Face's ranking score: the log-probability divided by output length ** length_penalty."""
        return self.cum_logprob / (len(self.token_ids) ** length_penalty)


async def search(engine: EngineClient, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams,
                 beam_width: int, length_penalty: float, eos_token_id: int | None) -> tuple[list[Beam], list | None]:
    """The ``beam_width`` best beams of ``prompt_ids``, best first, each finished (``finish_reason`` "stop" or
    "length"), and the prompt's logprobs if ``params.prompt_logprobs`` asked. ``params``: the request's (its
    ``max_tokens``, stop tokens, ``min_tokens``, ``logprobs`` and logit adjustments). Engine errors propagate;
    cancelling aborts the step's requests."""
    stops = set(params.stop_token_ids)
    if eos_token_id is not None and not params.ignore_eos:
        stops.add(eos_token_id)
    # 2 * beam_width candidates per beam leave beam_width to live on however many finish (vLLM's choice); one more
    # per stop token keeps that true when several stop tokens are among the most likely
    width = 2 * beam_width + len(stops)
    step = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=max(width, params.logprobs or 0),
                          repetition_penalty=params.repetition_penalty, logit_bias=params.logit_bias,
                          allowed_token_ids=params.allowed_token_ids)
    first = replace(step, prompt_logprobs=params.prompt_logprobs)  # the prompt is scored once, if asked
    live, done, prompt_logprobs = [Beam()], [], None
    for n in range(params.max_tokens):
        # 1. one greedy token per live beam, with its next-token distribution's head
        outs = await _gather([_one_token(engine, f"{request_id}-{n}-{b}", prompt_ids + beam.token_ids,
                                         first if n == 0 else step) for b, beam in enumerate(live)])
        if n == 0:
            prompt_logprobs = outs[0].prompt_logprobs
        # 2. every beam's candidates, by cumulative log-probability (ties: beam order, then rank)
        candidates = []
        for beam, out in zip(live, outs):
            top = out.logprobs[0][1]
            for rank, (token, logprob) in enumerate(top[:width], start=1):
                if logprob != float("-inf"):  # masked (allowed_token_ids): never a continuation
                    entry = (logprob, top[:params.logprobs], rank) if params.logprobs is not None else None
                    candidates.append((beam.cum_logprob + logprob, beam, token, entry))
        candidates.sort(key=lambda c: -c[0])
        # 3. stop tokens finish a beam (not before min_tokens, as the sampler blocks them); the beam_width best others
        # live on, and after the last step they finish by length
        last = n + 1 == params.max_tokens
        live, extended = [], 0
        for cum, beam, token, entry in candidates:
            is_stop = token in stops
            if is_stop and len(beam.token_ids) < params.min_tokens:
                continue
            if not is_stop:
                if extended == beam_width:
                    continue
                extended += 1
            grown = Beam(beam.token_ids + (token,), cum, beam.logprobs + ((entry,) if entry else ()),
                         "stop" if is_stop else "length" if last else None)
            (done if grown.finish_reason else live).append(grown)
        done = sorted(done, key=lambda b: -b.score(length_penalty))[:beam_width]  # only these can be returned
        if not live or _settled(live, done, beam_width, length_penalty, params.max_tokens):
            break
    return done, prompt_logprobs


def _settled(live: list[Beam], best: list[Beam], beam_width: int, length_penalty: float, max_tokens: int) -> bool:
    """No live beam can still rank among ``best``, the ``beam_width`` best finished ones: a beam's log-probability
    only falls as it grows, so its best possible score is at the longest length (length_penalty > 0) or the next
    one (otherwise)."""
    if len(best) < beam_width:
        return False
    threshold = best[-1].score(length_penalty)
    return all(b.cum_logprob / ((max_tokens if length_penalty > 0 else len(b.token_ids) + 1) ** length_penalty)
               < threshold for b in live)


async def _one_token(engine: EngineClient, request_id: str, prompt_ids: tuple[int, ...],
                     params: SamplingParams) -> RequestOutput:
    gen = engine.generate(request_id, prompt_ids, params)
    try:
        async for out in gen:
            if out.finished:
                return out
    finally:
        await gen.aclose()  # a cancelled step aborts its request
    raise AssertionError(f"engine stream of {request_id} ended unfinished")


async def _gather(coros) -> list:
    """Run concurrently; the first error cancels the others (and aborts their requests)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class BeamSearch(Fanout):
    """A ``use_beam_search`` request's choices (prompts × n): each prompt's n choices are its n best beams, in
    order. The same interface as ``Fanout``; ``stream`` yields each choice once, whole (text, tokens, logprobs,
    finish reason), when its prompt's search has ended: a beam is only known to be among the best then.
    ``decode(ids, skip_special_tokens)``: the tokenizer's."""

    def __init__(self, engine: EngineClient, request_id: str, choices: list[Choice], length_penalty: float,
                 eos_token_id: int | None, decode):
        super().__init__(engine, request_id, choices, share_prefill=False)
        self.length_penalty = length_penalty
        self.eos_token_id = eos_token_id
        self._decode = decode

    async def stream(self):
        groups: dict[int, list[Choice]] = {}
        for c in self.choices:
            groups.setdefault(c.leader, []).append(c)
        pending = {asyncio.ensure_future(self._search(group)): group for group in groups.values()}
        try:
            while pending:
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(finished, key=lambda t: pending[t][0].index):
                    group = pending.pop(task)
                    beams, prompt_logprobs = task.result()
                    if len(beams) < len(group):  # allowed_token_ids (or a tiny vocabulary) leave fewer sequences
                        raise InvalidRequestError(f"n: only {len(beams)} beams can be formed under this request's "
                                                  f"constraints, fewer than n ({len(group)}); lower n", param="n")
                    for c, beam in zip(group, beams):
                        out = self._output(c, beam, prompt_logprobs)
                        self._record(c, out)
                        yield c, out
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _search(self, group: list[Choice]):
        leader = group[0]
        return await search(self.engine, f"{self.engine_id(leader)}-beam", leader.prompt_ids, leader.params,
                            len(group), self.length_penalty, self.eos_token_id)

    def _output(self, c: Choice, beam: Beam, prompt_logprobs: list | None) -> RequestOutput:
        # a stop token's text only with include_stop_str_in_output, as the engine's detokenizer does
        shown = beam.token_ids[:-1] if beam.finish_reason == "stop" and not c.params.include_stop_str_in_output \
            else beam.token_ids
        return RequestOutput(
            request_id=self.engine_id(c), text=self._decode(list(shown), c.params.skip_special_tokens),
            token_ids=list(beam.token_ids), num_prompt_tokens=len(c.prompt_ids),
            num_output_tokens=len(beam.token_ids), finish_reason=beam.finish_reason,
            logprobs=list(beam.logprobs) if c.params.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs)
