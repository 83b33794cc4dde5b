"""The batched sampler: greedy rows untouched, top-k / top-p / min-p / temperature per row, seeded draws
reproducible and batch-invariant (a function of seed and position, whatever else is in the batch); every control
equal to its definition applied to one row at a time."""

import math
import random

import pytest
import torch

from raytp.gang.sampler import sample
from raytp.messages import SamplingParams


def _logits(rows=4, vocab=50, seed=0):
    torch.manual_seed(seed)
    return torch.randn(rows, vocab)


def test_greedy_is_argmax():
    logits = _logits()
    params = [SamplingParams(max_tokens=1, temperature=0.0)] * 4
    assert sample(logits, params, [0] * 4).tolist() == logits.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_argmax():
    logits = _logits()
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=1, seed=1),
              SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6, seed=2)] * 2
    assert sample(logits, params, [3, 4, 5, 6]).tolist() == logits.argmax(-1).tolist()


def test_top_k_and_top_p_restrict_support():
    logits = _logits()[0:1]
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    nucleus = set(order[:int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    k3 = SamplingParams(max_tokens=1, temperature=2.0, top_k=3, seed=7)
    p5 = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=7)
    assert {sample(logits, [k3], [pos]).item() for pos in range(200)} == top3
    assert {sample(logits, [p5], [pos]).item() for pos in range(200)} == nucleus


def test_draws_follow_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=11)
    counts = torch.bincount(torch.tensor([sample(logits, [p], [pos]).item() for pos in range(3000)]), minlength=3)
    want = torch.softmax(logits[0], -1) * 3000
    assert ((counts - want).abs() < 4 * want.sqrt() + 5).all(), (counts, want)


@pytest.mark.parametrize("trial", range(5))
def test_seeded_sampling_is_batch_invariant(trial):
    """Property: a seeded row gets the same token alone and inside any batch of other rows (greedy or sampled,
    any sizes, any position in the batch)."""
    rng = random.Random(trial)
    vocab = rng.choice([50, 1000, 32000])
    row = _logits(1, vocab, seed=trial)
    p = SamplingParams(max_tokens=1, temperature=rng.uniform(0.3, 2.0), top_k=rng.choice([0, 5, 40]),
                       top_p=rng.choice([1.0, 0.9, 0.3]), min_p=rng.choice([0.0, 0.05]), seed=rng.randrange(2**31))
    alone = [sample(row, [p], [pos]).item() for pos in range(20)]
    for _ in range(3):
        others = rng.randint(1, 12)
        batch = torch.cat([_logits(others, vocab, seed=rng.randrange(1000)), row])
        where = rng.randrange(others + 1)
        batch = torch.cat([batch[:where], row, batch[where:-1]])
        params = [SamplingParams(max_tokens=1, temperature=rng.choice([0.0, 0.7, 1.3]), top_k=rng.choice([0, 3]),
                                 seed=rng.randrange(99)) for _ in range(others + 1)]
        params[where] = p
        got = [sample(batch, params, [pos] * (others + 1))[where].item() for pos in range(20)]
        assert got == alone


def _reference_adjust(p: SamplingParams, row: torch.Tensor, context: list[int], num_prompt: int, position: int):
    """One row, one token at a time, straight from the definitions (vLLM's order)."""
    row = row.clone()
    if p.allowed_token_ids:
        for t in range(len(row)):
            if t not in p.allowed_token_ids:
                row[t] = float("-inf")
    for t, b in p.logit_bias:
        row[t] += b
    if position - num_prompt < p.min_tokens:
        for t in p.eos_token_ids + p.stop_token_ids:
            row[t] = float("-inf")
    for t in set(context):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    output = context[num_prompt:]
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return row


def test_allowed_tokens_penalties_bias_and_min_tokens_equal_their_definitions_row_by_row():
    from raytp.gang.sampler import adjusted

    rng = random.Random(0)
    vocab, rows = 30, 6
    logits = _logits(rows, vocab, seed=3)
    params, contexts, positions = [], [], []
    for i in range(rows):
        num_prompt = rng.randint(1, 6)
        context = [rng.randrange(vocab) for _ in range(num_prompt + rng.randint(0, 8))]
        params.append(SamplingParams(
            max_tokens=20, temperature=0.0, presence_penalty=rng.uniform(-2, 2), frequency_penalty=rng.uniform(-2, 2),
            repetition_penalty=rng.choice([1.0, 0.7, 1.5]), min_tokens=rng.choice([0, 3, 30]),
            logit_bias=tuple((rng.randrange(vocab), rng.uniform(-100, 100)) for _ in range(rng.randint(0, 3))),
            stop_token_ids=(rng.randrange(vocab),), eos_token_ids=(0,),
            allowed_token_ids=tuple(sorted(rng.sample(range(vocab), rng.randint(1, 8)))) if i % 2 else ()))
        contexts.append((tuple(context), num_prompt))
        positions.append(len(context))
    got = adjusted(params, logits, contexts, positions)
    want = torch.stack([_reference_adjust(p, logits[i], list(c), n, pos)
                        for i, (p, (c, n), pos) in enumerate(zip(params, contexts, positions))])
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.isinf(got).any(), "min_tokens masked something (the check can fail)"
    for i in range(1, rows, 2):  # allowed_token_ids: every other token is out, whatever the adjustments
        assert set(torch.isfinite(got[i]).nonzero().flatten().tolist()) <= set(params[i].allowed_token_ids)


def test_logit_bias_and_min_tokens_decide_greedy_tokens():
    logits = _logits(1, 20, seed=1)
    best = int(logits.argmax())
    forced = SamplingParams(max_tokens=4, temperature=0.0, logit_bias=((7, 100.0),))
    banned = SamplingParams(max_tokens=4, temperature=0.0, logit_bias=((best, -100.0),))
    assert sample(logits, [forced], [5], [((1, 2, 3, 4, 5), 5)]).item() == 7
    assert sample(logits, [banned], [5], [((1, 2, 3, 4, 5), 5)]).item() != best
    eos = SamplingParams(max_tokens=4, temperature=0.0, min_tokens=2, eos_token_ids=(best,))
    assert sample(logits, [eos], [6], [((1, 2, 3, 4, 5, 9), 5)]).item() != best  # 1 output < min_tokens
    assert sample(logits, [eos], [7], [((1, 2, 3, 4, 5, 9, 9), 5)]).item() == best  # 2 outputs: allowed


def test_penalized_seeded_rows_are_batch_invariant():
    logits = _logits(3, 40, seed=5)
    p = SamplingParams(max_tokens=8, temperature=0.8, seed=11, frequency_penalty=1.0, repetition_penalty=1.2)
    ctx = ((3, 4, 5, 5, 6), 3)
    alone = sample(logits[1:2], [p], [5], [ctx]).item()
    other = SamplingParams(max_tokens=8, temperature=1.0, seed=2)
    batched = sample(logits, [other, p, SamplingParams(max_tokens=8, temperature=0.0)], [9, 5, 4],
                     [((1,), 1), ctx, ((2,), 1)])
    assert batched[1].item() == alone


def _reference_distribution(p: SamplingParams, row: torch.Tensor) -> list[float]:
    """What one sampled row draws from, token by token from the definitions in vLLM's order: temperature; min-p
    (tokens below min_p x the top token's probability out); top-k (the k most likely stay); top-p (the most
    likely tokens until their mass reaches top_p stay, at least one)."""
    vocab = len(row)
    scores = (row.double() / p.temperature).tolist()
    z = sum(math.exp(x) for x in scores)
    probs = [math.exp(x) / z for x in scores]
    kept = [t for t in range(vocab) if probs[t] >= p.min_p * max(probs)]
    kept = sorted(kept, key=lambda t: -probs[t])[:p.top_k or vocab]
    mass = sum(probs[t] for t in kept)
    nucleus, total = [], 0.0
    for t in kept:
        if nucleus and total >= p.top_p:
            break
        nucleus.append(t)
        total += probs[t] / mass
    out = [0.0] * vocab
    for t in nucleus:
        out[t] = probs[t] / sum(probs[u] for u in nucleus)
    return out


@pytest.mark.parametrize("trial", range(4))
def test_min_p_top_k_top_p_distribution_equals_the_definitions_row_by_row(trial):
    from raytp.gang.sampler import sorted_distribution

    rng = random.Random(trial)
    rows, vocab = 6, 40
    logits = _logits(rows, vocab, seed=10 + trial) * 3
    params = [SamplingParams(max_tokens=1, temperature=rng.choice([0.5, 1.0, 1.7]), min_p=rng.choice([0.0, 0.02, 0.2]),
                             top_k=rng.choice([0, 4, 15]), top_p=rng.choice([1.0, 0.8]), seed=i) for i in range(rows)]
    probs, order = sorted_distribution(logits, params)
    got = torch.zeros(rows, vocab, dtype=torch.float64).scatter_(1, order, probs.double())
    got = got / got.sum(-1, keepdim=True)
    want = torch.tensor([_reference_distribution(p, logits[i]) for i, p in enumerate(params)], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert any(p.min_p and (want[i] == 0).sum() > (vocab - (p.top_k or vocab)) for i, p in enumerate(params)), \
        "min_p cut tokens top-k kept (the check can fail)"


def test_min_p_draws_stay_in_its_support_and_allowed_tokens_decide_greedy_ones():
    logits = _logits(1, 30, seed=4) * 3
    probs = torch.softmax(logits[0], -1)
    support = set((probs >= 0.1 * probs.max()).nonzero().flatten().tolist())
    p = SamplingParams(max_tokens=1, temperature=1.0, min_p=0.1, seed=3)
    drawn = {sample(logits, [p], [pos]).item() for pos in range(300)}
    assert drawn == support and len(support) < 30
    allowed = (3, 17, 21)
    best = max(allowed, key=lambda t: logits[0, t].item())
    greedy = SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=allowed)
    assert sample(logits, [greedy], [0], [((1,), 1)]).item() == best
    sampled = SamplingParams(max_tokens=1, temperature=1.0, seed=5, allowed_token_ids=allowed)
    assert {sample(logits, [sampled], [pos], [((1,), 1)]).item() for pos in range(100)} <= set(allowed)
