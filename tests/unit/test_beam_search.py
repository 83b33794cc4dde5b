"""Beam search (``use_beam_search``) through the replica's OpenAI layer.

On the real tiny model (the paged engine in process, ``LocalExecutor``, float32, no Ray), the n choices are
transformers' ``generate(num_beams=n, num_return_sequences=n)`` beams, token for token and score for score (lengths
fixed at max_tokens: ``ignore_eos`` here, no EOS there). What needs EOS (stop tokens, ``min_tokens``, the length
penalty between finished lengths, ending early) is checked on ``search`` over a fake engine whose next-token
distributions are a function of the context."""

import asyncio
import math
import random

import pytest
import torch

from raytp.engine.protocol import RequestOutput
from raytp.messages import SamplingParams
from raytp.serve import beam_search
from tests.unit.test_openai_extensions_model import serve, token_ids

PROMPTS = ["the model serves tokens across ranks", "requests arrive"]


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    from raytp.compat import dtype_kwarg

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, **dtype_kwarg(torch.float32)).eval()


def hf_beams(model, ids, n, max_tokens, length_penalty):
    """transformers' n best beams of ``ids`` (token ids after the prompt) and their scores."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), num_beams=n, num_return_sequences=n, do_sample=False,
                             max_new_tokens=max_tokens, length_penalty=length_penalty, early_stopping=True,
                             eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    beams = out.sequences[:, len(ids):].tolist()
    assert all(len(b) == max_tokens for b in beams)  # no EOS: every beam has the fixed length
    return beams, out.sequences_scores.tolist()


@pytest.mark.parametrize("n,length_penalty", [(2, 1.0), (3, 0.5), (4, 2.0)])
def test_the_choices_are_transformers_beams(model, tiny_tokenizer, n, length_penalty):
    tok, max_tokens = tiny_tokenizer, 6
    prompts = [tok.encode(p) for p in PROMPTS]
    body = {"prompt": prompts, "use_beam_search": True, "n": n, "max_tokens": max_tokens, "ignore_eos": True,
            "length_penalty": length_penalty, "logprobs": 1, "return_tokens_as_token_ids": True}
    (got,) = serve(model, tok, (body, False))
    assert got["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": len(prompts) * n *
                            max_tokens, "total_tokens": sum(map(len, prompts)) + len(prompts) * n * max_tokens}
    for i, ids in enumerate(prompts):
        choices = got["choices"][i * n:(i + 1) * n]
        want, scores = hf_beams(model, ids, n, max_tokens, length_penalty)
        assert [token_ids(c) for c in choices] == want
        assert [c["text"] for c in choices] == [tok.decode(b) for b in want]
        assert all(c["finish_reason"] == "length" for c in choices)
        # the logprobs of the chosen tokens sum to the beam's log-probability, which transformers normalizes
        assert [sum(c["logprobs"]["token_logprobs"]) / max_tokens ** length_penalty for c in choices] == \
            pytest.approx(scores, abs=1e-4)


def test_streamed_beams_come_whole_once_the_search_ends(model, tiny_tokenizer):
    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.gang.local import LocalExecutor
    from raytp.serve.openai_serving import OpenAIServing

    cfg = resolve({"model": "raytp-tiny-llama", "tensor_parallel_size": 1, "device": "cpu", "dtype": "float32",
                   "block_size": 4, "max_model_len": 256})
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "use_beam_search": True, "n": 3,
            "max_tokens": 5, "ignore_eos": True}

    async def main():
        engine = make_engine(cfg, LocalExecutor(cfg, model=model), tiny_tokenizer)
        await engine.start()
        try:
            serving = OpenAIServing(cfg, tiny_tokenizer, engine)
            whole = await serving.completion(body, True)
            streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
            chunks = [c async for c in serving.completion_stream(streamed, True)]
            return whole, chunks
        finally:
            engine.shutdown()

    whole, chunks = asyncio.run(main())
    *per_choice, usage = chunks
    assert [c["choices"][0]["index"] for c in per_choice] == [0, 1, 2]
    assert [c["choices"][0]["delta"] for c in per_choice] == [
        {"role": "assistant", "content": c["message"]["content"]} for c in whole["choices"]]
    assert [c["choices"][0]["finish_reason"] for c in per_choice] == ["length"] * 3
    assert usage["usage"] == whole["usage"] and whole["usage"]["completion_tokens"] == 15


def test_one_beam_is_greedy_decoding(model, tiny_tokenizer):
    ids = tiny_tokenizer.encode(PROMPTS[1])
    common = {"prompt": ids, "max_tokens": 8, "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    beam, greedy = serve(model, tiny_tokenizer, ({**common, "use_beam_search": True}, False),
                         ({**common, "temperature": 0}, False))
    assert token_ids(beam["choices"][0]) == token_ids(greedy["choices"][0])


# ---- the search over a fake engine: EOS, stop tokens, min_tokens, ending early -------------------------------
EOS, VOCAB = 2, 8


class FakeEngine:
    """Next-token log-probabilities over VOCAB tokens, a seeded function of the context; ``bias`` adds to some
    tokens' logits after a given context. Counts the requests it answers."""

    def __init__(self, seed=0, bias=None):
        self.seed, self.bias, self.requests = seed, bias or {}, 0

    def distribution(self, context):
        rng = random.Random(hash((self.seed, context)))
        logits = [rng.gauss(0, 2) for _ in range(VOCAB)]
        for token, add in self.bias.get(context, {}).items():
            logits[token] += add
        norm = math.log(sum(math.exp(x) for x in logits))
        return sorted(((t, x - norm) for t, x in enumerate(logits)), key=lambda e: -e[1])

    async def generate(self, request_id, prompt_ids, params: SamplingParams):
        self.requests += 1
        assert params.max_tokens == 1 and params.temperature == 0.0 and params.ignore_eos
        top = tuple(self.distribution(tuple(prompt_ids))[:params.logprobs])
        yield RequestOutput(request_id, "", [top[0][0]], len(prompt_ids), 1, "length",
                            logprobs=[(top[0][1], top, 1)])


def run_search(engine, width=3, length_penalty=1.0, eos=EOS, **params) -> list[beam_search.Beam]:
    params = SamplingParams(**{"max_tokens": 6, "logprobs": 0, **params})  # logprobs: keep each token's entry
    beams, _ = asyncio.run(beam_search.search(engine, "r", (1,), params, width, length_penalty, eos))
    return beams


def test_eos_finishes_a_beam_and_scores_count_it():
    # after the prompt, EOS is by far the most likely token: a one-token beam that is finished
    beams = run_search(FakeEngine(bias={(1,): {EOS: 8.0}}))
    assert beams[0].token_ids == (EOS,) and beams[0].finish_reason == "stop"
    for b in beams:  # a beam ends on EOS or at max_tokens, and holds its tokens' logprobs
        assert (b.token_ids[-1] == EOS) if b.finish_reason == "stop" else len(b.token_ids) == 6, b
        assert sum(entry[0] for entry in b.logprobs) == pytest.approx(b.cum_logprob)
    assert [b.score(1.0) for b in beams] == sorted((b.score(1.0) for b in beams), reverse=True)
    # the length penalty decides between lengths: none favours the short finished beams, a large one the long
    assert [b.token_ids[-1] for b in run_search(FakeEngine(bias={(1,): {EOS: 3.0}}), length_penalty=0.0)] == [EOS] * 3
    assert (EOS,) not in [b.token_ids for b in run_search(FakeEngine(bias={(1,): {EOS: 3.0}}), length_penalty=4.0)]
    assert run_search(FakeEngine(bias={(1,): {EOS: 8.0}}), ignore_eos=True)[0].finish_reason == "length"


def test_min_tokens_and_stop_token_ids():
    assert all(len(b.token_ids) >= 3 for b in run_search(FakeEngine(bias={(1,): {EOS: 8.0}}), min_tokens=2))
    stopped = run_search(FakeEngine(bias={(1,): {5: 8.0}}), stop_token_ids=(5,), eos=None)
    assert stopped[0].token_ids == (5,) and stopped[0].finish_reason == "stop"


@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 0.5, 1.0, 2.0])
def test_ending_early_changes_no_result(monkeypatch, length_penalty):
    """The search stops once no live beam can reach the n best finished ones; every step to max_tokens gives the
    same beams."""
    saved = 0  # step requests
    for seed in range(20):
        bias = {(1,): {EOS: 2.0}, (1, 3): {EOS: 4.0}}
        engine = FakeEngine(seed, bias)
        early = run_search(engine, width=2, length_penalty=length_penalty, max_tokens=12)
        with monkeypatch.context() as m:
            m.setattr(beam_search, "_settled", lambda *a: False)
            full_engine = FakeEngine(seed, bias)
            full = run_search(full_engine, width=2, length_penalty=length_penalty, max_tokens=12)
        assert early == full, seed
        saved += full_engine.requests - engine.requests
    if length_penalty < 1:  # short finished beams settle the search (a larger penalty keeps long beams hopeful)
        assert saved > 0
