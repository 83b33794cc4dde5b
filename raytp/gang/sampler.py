"""Token sampling for a whole batch in one pass (every rank runs it on the same logits; rank 0's tokens travel back
to the driver, every rank keeps them as the next step's inputs).

Greedy rows take the argmax. Sampled rows: temperature, min-p, top-k and top-p (vLLM's order) are per-row
tensors applied to the rows' logits sorted once, then one inverse-CDF draw per row. The draw's uniform number
is a hash of the request's seed and the position being sampled, not a stateful generator: a seeded request gets
the same tokens alone or in any batch (each row's math only reads that row), across preemption and recompute, and
ranks keep no sampling state at all. Every step is a pure function of its inputs (ties sorted stably), so ranks
holding the same logits draw the same tokens.
"""

from __future__ import annotations

import hashlib

import torch

from raytp.messages import SamplingParams, TokenLogprob


def processed(logits: torch.Tensor, params: list[SamplingParams], positions: list[int], contexts, allowed):
    """Float logits with every row's processing applied: grammar masks, then ``adjusted``'s (never in place)."""
    logits = logits.float()
    masked = [i for i, a in enumerate(allowed or ()) if a is not None]
    adjust = [i for i, p in enumerate(params) if p.adjusts_logits]
    if masked or adjust:
        logits = logits.clone()
    if masked:
        words = torch.stack([torch.frombuffer(bytearray(allowed[i]), dtype=torch.int32) for i in masked])
        bits = (words.to(logits.device)[:, :, None] >> torch.arange(32, device=logits.device)) & 1
        bits = bits.view(len(masked), -1).bool()[:, :logits.shape[1]]
        ok = torch.zeros((len(masked), logits.shape[1]), dtype=torch.bool, device=logits.device)
        ok[:, :bits.shape[1]] = bits  # ids past the tokenizer's vocabulary (padded embeddings): never
        logits[masked] = logits[masked].masked_fill(~ok, float("-inf"))
    if adjust:
        logits[adjust] = adjusted([params[i] for i in adjust], logits[adjust], [contexts[i] for i in adjust],
                                  [positions[i] for i in adjust])
    return logits


def adjusted(params: list[SamplingParams], logits: torch.Tensor, contexts: list[tuple[tuple[int, ...], int]],
             positions: list[int]) -> torch.Tensor:
    """vLLM's order, every step one batched pass over these rows: allowed_token_ids (every other token masked),
    logit_bias, min_tokens (EOS and stop tokens masked while fewer outputs than that exist), repetition penalty
    over prompt + output, frequency and presence penalties over the output. A context's token ids are only needed
    (and only sent) for penalties."""
    rows, vocab = logits.shape
    dev = logits.device

    def padded(seqs: list) -> torch.Tensor:  # ragged id lists → [rows, width], padding with the dummy id ``vocab``
        width = max((len(x) for x in seqs), default=0)
        return torch.tensor([list(x) + [vocab] * (width - len(x)) for x in seqs], dtype=torch.long,
                            device=dev).view(rows, width)

    def scattered(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # sum of values per (row, id)
        out = torch.zeros((rows, vocab + 1), dtype=values.dtype, device=dev)
        return out.scatter_add_(1, ids, values)[:, :vocab]

    if any(p.allowed_token_ids for p in params):
        ids = padded([p.allowed_token_ids for p in params])
        ok = scattered(ids, torch.ones(ids.shape, device=dev)) > 0
        unlimited = torch.tensor([not p.allowed_token_ids for p in params], device=dev)[:, None]
        logits = logits.masked_fill(~(ok | unlimited), float("-inf"))
    if any(p.logit_bias for p in params):
        ids = padded([[t for t, _ in p.logit_bias] for p in params])
        bias = torch.tensor([[b for _, b in p.logit_bias] + [0.0] * (ids.shape[1] - len(p.logit_bias))
                             for p in params], device=dev).view(ids.shape)
        logits = logits + scattered(ids, bias)
    outputs = [ctx[n:] for ctx, n in contexts]
    if any(p.min_tokens for p in params):
        blocked = padded([p.eos_token_ids + p.stop_token_ids if pos - n < p.min_tokens else ()
                          for p, pos, (_, n) in zip(params, positions, contexts)])
        mask = scattered(blocked, torch.ones(blocked.shape, device=dev)) > 0
        logits = logits.masked_fill(mask, float("-inf"))
    if any(p.needs_history for p in params):
        rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
        seen = scattered(padded([ctx for ctx, _ in contexts]), torch.ones(rows, max(
            (len(c) for c, _ in contexts), default=0), device=dev)) > 0
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        out_ids = padded(outputs)
        counts = scattered(out_ids, torch.ones(out_ids.shape, device=dev))
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
        logits = logits - freq * counts - pres * (counts > 0)
    return logits


def uniform(seed: int, position: int) -> float:
    """A number in [0, 1) fixed by (seed, position) (the engine gives every sampled request a seed)."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
           contexts: list[tuple[tuple[int, ...], int]] | None = None,
           allowed: list[bytes | None] | None = None) -> torch.Tensor:
    """``logits`` [B, V] → token ids [B]. ``positions[i]``: the sequence position row i's token will take.
    ``contexts[i]``: (every token of row i's sequence before that position, its prompt length) — read only for
    rows whose params adjust logits (penalties, logit_bias, min_tokens). ``allowed[i]``: a structured-output
    row's packed bitmask of allowed tokens (None: unconstrained)."""
    logits = processed(logits, params, positions, contexts, allowed)
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    dev, vocab = logits.device, logits.shape[-1]
    sampled = [params[i] for i in rows]
    idx = torch.tensor(rows, device=dev)
    u = torch.tensor([uniform(p.seed, positions[i]) for p, i in zip(sampled, rows)], dtype=torch.float64,
                     device=dev)
    probs, order = sorted_distribution(logits[idx], sampled)
    cdf = probs.double().cumsum(-1)
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=vocab - 1)
    tokens[idx] = order.gather(1, choice).squeeze(1)
    return tokens


def sorted_distribution(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """What sampled rows draw from: (probabilities [B, V], unnormalized, in descending order of the logits; the
    token id of each column). vLLM's order: temperature, then min-p (cut tokens less likely than min_p times the
    most likely one), then top-k, then top-p (the smallest prefix whose mass reaches top_p, at least one token)."""
    dev, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=dev)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    # stable: equal scores in token order, whatever the sort kernel (every rank must choose the same token)
    scores, order = (logits / temperature[:, None]).sort(dim=-1, descending=True, stable=True)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev)
        full = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(full < min_p[:, None] * full[:, :1], float("-inf"))
    scores = scores.masked_fill(torch.arange(vocab, device=dev)[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], 0.0)
    return probs, order


def token_logprobs(logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
                   contexts: list[tuple[tuple[int, ...], int]], tokens: torch.Tensor,
                   allowed: list[bytes | None] | None = None) -> list[TokenLogprob | None]:
    """For rows whose params ask for logprobs: the sampled token's log-probability and the ``logprobs`` most likely
    tokens', under the distribution it was drawn from (grammar mask, logit_bias, penalties, temperature applied;
    greedy rows at temperature 1; top-k / top-p cuts not applied). One batched pass over those rows."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return [None] * len(params)
    pick = lambda xs: [xs[i] for i in rows] if xs is not None else None  # noqa: E731
    lg = processed(logits[rows], pick(params), pick(positions), pick(contexts), pick(allowed))
    temperature = torch.tensor([params[i].temperature or 1.0 for i in rows], device=lg.device)
    lp = torch.log_softmax(lg / temperature[:, None], dim=-1)
    entries = _entries(lp, tokens[rows], [params[i].logprobs for i in rows])
    out: list[TokenLogprob | None] = [None] * len(params)
    for i, entry in zip(rows, entries):
        out[i] = entry
    return out


def _entries(lp: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """Per row of log-probabilities ``lp`` [N, V]: (the target's, its ``ks[row]`` most likely tokens', the target's
    rank: how many tokens are at least as likely, itself included, as vLLM counts)."""
    chosen = lp.gather(1, targets[:, None])
    ranks = (lp >= chosen).sum(-1).tolist()
    chosen = chosen.squeeze(1).tolist()
    k = max(ks)
    top_lp, top_id = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_lp, top_id = top_lp.tolist(), top_id.tolist()
    return [(chosen[j], tuple(zip(top_id[j][:n], top_lp[j][:n])), ranks[j]) for j, n in enumerate(ks)]


def prompt_token_logprobs(logits: torch.Tensor, rows) -> tuple:
    """Prompt logprobs (echo) of a step: ``rows`` = (row, index of its first logits row, target prompt tokens);
    the logits at position p score the prompt token at p + 1, at temperature 1 with nothing applied (the prompt
    was not sampled). Returns StepOutput.prompt_logprobs' entries."""
    index = torch.cat([torch.arange(first, first + len(targets)) for _, first, targets in rows]).to(logits.device)
    lp = torch.log_softmax(logits[index].float(), dim=-1)
    targets = torch.tensor([t for _, _, ts in rows for t in ts], device=logits.device)
    entries = _entries(lp, targets, [r.params.prompt_logprobs for r, _, ts in rows for _ in ts])
    out, at = [], 0
    for r, _, ts in rows:
        out.append((r.seq_id, r.start_pos + 1, tuple(entries[at:at + len(ts)])))
        at += len(ts)
    return tuple(out)
