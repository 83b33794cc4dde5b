"""vLLM's extension fields on the real tiny model, through the replica's OpenAI layer and the paged engine in
process (``LocalExecutor``, float32, no Ray), each checked against plain transformers: ``prompt_logprobs`` ==
log_softmax of its logits (the first null), ``min_p`` and ``allowed_token_ids`` == their definitions per row of a
batch, ``continue_final_message`` == the template's text continued."""

import asyncio

import pytest
import torch


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    from raytp.compat import dtype_kwarg

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, **dtype_kwarg(torch.float32)).eval()


def serve(model, tokenizer, *bodies):
    """Answer each (body, chat) in turn, concurrently within a body, from one replica's OpenAI layer."""
    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.gang.local import LocalExecutor
    from raytp.serve.openai_serving import OpenAIServing

    cfg = resolve({"model": "raytp-tiny-llama", "tensor_parallel_size": 1, "device": "cpu", "dtype": "float32",
                   "block_size": 4, "max_model_len": 256})

    async def main():
        engine = make_engine(cfg, LocalExecutor(cfg, model=model), tokenizer)
        await engine.start()
        try:
            serving = OpenAIServing(cfg, tokenizer, engine)
            return [await serving.completion(body, chat) for body, chat in bodies]
        finally:
            engine.shutdown()

    return asyncio.run(main())


def logprobs_of(model, ids) -> torch.Tensor:
    """log_softmax of plain transformers' logits at every position of ``ids`` (no cache)."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([list(ids)])).logits[0].float(), -1)


def token_ids(choice) -> list[int]:
    """A completion choice's token ids, from logprobs asked with return_tokens_as_token_ids."""
    return [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]


PROMPTS = ["the model serves tokens across ranks", "requests arrive", "while the gang keeps every shard in"]


def test_prompt_logprobs_are_the_models_log_softmax(model, tiny_tokenizer):
    tok = tiny_tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    (body, in_chat) = serve(model, tok, ({"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 3},
                                         False),
                            ({"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 1,
                              "prompt_logprobs": 0}, True))
    for choice, prompt in zip(body["choices"], ids):
        got = choice["prompt_logprobs"]
        lp = logprobs_of(model, prompt)
        assert got[0] is None and len(got) == len(prompt)
        for p in range(1, len(prompt)):
            row, token = lp[p - 1], prompt[p]
            entry = got[p][str(token)]
            assert entry["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
            assert entry["rank"] == int((row >= row[token]).sum()) and entry["decoded_token"] == tok.decode([token])
            top = row.topk(3).indices.tolist()
            assert set(got[p]) == {str(t) for t in top} | {str(token)}  # the prompt token and 3 alternatives
            assert [got[p][str(t)]["rank"] for t in top] == [1, 2, 3]
    chat_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
    lp = logprobs_of(model, chat_ids)
    assert in_chat["prompt_logprobs"][0] is None and len(in_chat["prompt_logprobs"]) == len(chat_ids)
    assert [d[str(t)]["logprob"] for d, t in zip(in_chat["prompt_logprobs"][1:], chat_ids[1:])] == pytest.approx(
        [lp[p - 1, t].item() for p, t in enumerate(chat_ids[1:], start=1)], abs=1e-4)


def test_min_p_draws_only_tokens_its_definition_keeps_row_by_row(model, tiny_tokenizer):
    """Sampled first tokens of a batch (3 prompts x 12 choices): each within {t : p_t >= min_p x max p} of its own
    row of transformers' softmax (temperature 1); the same draws without min_p leave that set (the check can
    fail)."""
    tok, min_p = tiny_tokenizer, 0.3
    ids = [tok.encode(p) for p in PROMPTS]
    body = {"prompt": ids, "max_tokens": 1, "n": 12, "temperature": 1.0, "seed": 5, "logprobs": 0,
            "return_tokens_as_token_ids": True, "ignore_eos": True}
    cut, free = serve(model, tok, ({**body, "min_p": min_p}, False), (body, False))
    outside = 0
    for i, prompt in enumerate(ids):
        probs = logprobs_of(model, prompt)[-1].exp()
        keeps = set((probs >= min_p * probs.max()).nonzero().flatten().tolist())
        for choice in cut["choices"][i * 12:(i + 1) * 12]:
            assert token_ids(choice)[0] in keeps
        outside += sum(token_ids(c)[0] not in keeps for c in free["choices"][i * 12:(i + 1) * 12])
    assert outside > 0, "without min_p some draws leave its set"


def test_allowed_token_ids_greedy_equals_the_argmax_over_them_row_by_row(model, tiny_tokenizer):
    """Greedy with allowed_token_ids, 3 prompts batched, 5 tokens each: every token == the argmax of transformers'
    logits over the allowed ids only, recomputed without a cache from prompt + tokens so far."""
    tok = tiny_tokenizer
    allowed = sorted(set(tok.encode(" model tokens serves ranks the gang", add_special_tokens=False)))
    ids = [tok.encode(p) for p in PROMPTS]
    (body,) = serve(model, tok, ({"prompt": ids, "max_tokens": 5, "temperature": 0, "allowed_token_ids": allowed,
                                  "logprobs": 0, "return_tokens_as_token_ids": True, "ignore_eos": True}, False))
    free = []
    for choice, prompt in zip(body["choices"], ids):
        seq, want = list(prompt), []
        with torch.inference_mode():
            for _ in range(5):
                logits = model(torch.tensor([seq])).logits[0, -1]
                free.append(int(logits.argmax()))
                token = allowed[int(logits[allowed].argmax())]
                want.append(token)
                seq.append(token)
        assert token_ids(choice) == want
    assert any(t not in allowed for t in free), "the mask changed some token (the check can fail)"


def test_continue_final_message_continues_the_templates_text(model, tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "user", "content": "the model"}, {"role": "assistant", "content": "serves tokens"}]
    (body,) = serve(model, tok, ({"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                  "add_generation_prompt": False, "continue_final_message": True, "echo": True,
                                  "logprobs": True, "return_tokens_as_token_ids": True}, True))
    text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("serves tokens") and not text.endswith("</s>\n")  # the turn is left open
    ids = tok.encode(text, add_special_tokens=False)
    out = []
    with torch.inference_mode():
        for _ in range(6):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    assert body["usage"]["prompt_tokens"] == len(ids)
    choice = body["choices"][0]
    assert [int(t["token"].split(":")[1]) for t in choice["logprobs"]["content"]] == out
    assert choice["message"]["content"].startswith("serves tokens")  # echo: the message continued, then the model's
