import torch

from raytp.gang.sampler import make_generator, sample
from raytp.messages import SamplingParams


def _logits():
    torch.manual_seed(0)
    return torch.randn(4, 50)


def test_greedy_is_argmax():
    logits = _logits()
    params = [SamplingParams(max_tokens=1, temperature=0.0)] * 4
    assert sample(logits, params, [None] * 4).tolist() == logits.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_argmax():
    logits = _logits()
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=1, seed=1),
              SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6, seed=2)] * 2
    gens = [make_generator(p, "cpu") for p in params]
    assert sample(logits, params, gens).tolist() == logits.argmax(-1).tolist()


def test_seed_reproducible_and_rows_independent():
    logits = _logits()
    p = SamplingParams(max_tokens=1, temperature=1.5, seed=123)
    draws = [sample(logits[:1], [p], [make_generator(p, "cpu")]).item() for _ in range(3)]
    assert len(set(draws)) == 1
    mixed = [SamplingParams(max_tokens=1, temperature=0.0), p]
    out = sample(logits[:2].clone(), mixed, [None, make_generator(p, "cpu")])
    assert out[0].item() == logits[0].argmax().item()


def test_top_k_restricts_support():
    logits = _logits()[0:1]
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    p = SamplingParams(max_tokens=1, temperature=2.0, top_k=3, seed=7)
    g = make_generator(p, "cpu")
    assert {sample(logits, [p], [g]).item() for _ in range(50)} <= top3
