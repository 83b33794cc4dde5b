"""Token sampling for a whole batch in one pass (runs on rank 0 only; the tokens travel back to the driver).

Greedy rows take the argmax. Sampled rows: temperature, top-k and top-p are per-row tensors applied to the
rows' logits sorted once, then one inverse-CDF draw per row. The draw's uniform number is a hash of the
request's seed and the position being sampled, not a stateful generator: a seeded request gets the same
tokens alone or in any batch (each row's math only reads that row), across preemption and recompute, and
ranks keep no sampling state at all.
"""

from __future__ import annotations

import hashlib
import random

import torch

from raytp.messages import SamplingParams


def uniform(seed: int | None, position: int) -> float:
    """A number in [0, 1) fixed by (seed, position); an unseeded request draws a fresh one."""
    if seed is None:
        return random.random()
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> torch.Tensor:
    """``logits`` [B, V] → token ids [B]. ``positions[i]``: the sequence position row i's token will take."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    dev, vocab = logits.device, logits.shape[-1]
    sampled = [params[i] for i in rows]
    idx = torch.tensor(rows, device=dev)
    temperature = torch.tensor([p.temperature for p in sampled], device=dev)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in sampled], device=dev)
    top_p = torch.tensor([p.top_p for p in sampled], device=dev)
    u = torch.tensor([uniform(p.seed, positions[i]) for p, i in zip(sampled, rows)], dtype=torch.float64,
                     device=dev)
    scores, order = (logits[idx] / temperature[:, None]).sort(dim=-1, descending=True)
    scores = scores.masked_fill(torch.arange(vocab, device=dev)[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # top-p: keep the smallest prefix whose mass reaches top_p (always at least the top token)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], 0.0)
    cdf = probs.double().cumsum(-1)
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=vocab - 1)
    tokens[idx] = order.gather(1, choice).squeeze(1)
    return tokens
