"""The batched sampler: greedy rows untouched, top-k / top-p / temperature per row, seeded draws reproducible
and batch-invariant (a function of seed and position, whatever else is in the batch)."""

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
                       top_p=rng.choice([1.0, 0.9, 0.3]), seed=rng.randrange(2**31))
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
