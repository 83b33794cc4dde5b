"""Typed messages across the engine ⇄ gang seam: plain, picklable dataclasses, no torch, no Ray.

The engine sends every rank the same ``StepInput``; rank 0 answers with a ``StepOutput``.
Ranks keep no per-request state: every step says, for
each row, which tokens to compute, at which positions, and in which KV blocks (the
driver's scheduler owns the paged KV cache; ranks never allocate).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` means greedy; ``seed`` makes sampling reproducible."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # OpenAI penalties (vLLM's semantics): presence / frequency over the output so far, repetition over prompt +
    # output (logit / p if positive, * p if negative); logit_bias: (token id, bias) added to the logits
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # no EOS / stop token (and no stop-string check) before this many output tokens
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the sequence (their text is not returned)
    eos_token_ids: tuple[int, ...] = ()  # filled in by the engine: what min_tokens suppresses besides stop_token_ids
    # log-probabilities of each sampled token and of this many most likely alternatives (None: none), from the
    # distribution the token was drawn from: after logit_bias, penalties and temperature, before top-k / top-p
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo); no prefix reuse
    grammar: str | None = None  # structured output: an llguidance grammar the engine's matcher enforces

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        """Sampling this request reads its earlier tokens (penalties), so its rows carry them."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        return self.needs_history or bool(self.logit_bias) or self.min_tokens > 0


@dataclass(frozen=True)
class RowInput:
    """One sequence's share of a step: compute ``token_ids`` at positions ``start_pos ..``, writing their keys
    and values into the KV slots ``block_table[pos // block_size] * block_size + pos % block_size`` and attending
    to every earlier position of the sequence (already in its blocks). A decode row has one token (the last one
    sampled); a prefill row a chunk of its prompt (or, after preemption, of prompt + output so far).
    ``sample``: this chunk reaches the sequence's end, so one token is sampled from its last position."""

    seq_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    sample: bool
    params: SamplingParams
    num_prompt_tokens: int = 0  # of the sequence (rank 0's sampler counts outputs for min_tokens)
    history: tuple[int, ...] = ()  # prompt + output before this row's tokens, only if params.needs_history
    prompt_next: int | None = None  # prompt logprobs: the prompt token after this chunk, if the prompt goes on
    allowed: bytes | None = None  # structured output: packed int32 bitmask of the tokens allowed next (bit i = id i)

    @property
    def prompt_targets(self) -> tuple[int, ...]:
        """Prompt logprobs (echo): the prompt tokens this chunk's positions score, in order (the logits at
        position p score the token at p + 1, for every p + 1 inside the prompt); () if the row did not ask."""
        if self.params.prompt_logprobs is None or self.start_pos + 1 >= self.num_prompt_tokens:
            return ()
        count = min(len(self.token_ids), self.num_prompt_tokens - 1 - self.start_pos)
        return (self.token_ids[1:] + (self.prompt_next,))[:count]


@dataclass(frozen=True)
class StepInput:
    """One engine step, identical for every rank: one flat, unpadded forward over every row's tokens.
    ``finished_ids``: sequences that ended since the last step (ranks hold nothing for them; an executor that
    keeps per-request bookkeeping, like the scripted one, drops it).
    A step with no rows only releases."""

    rows: tuple[RowInput, ...] = ()
    finished_ids: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)


# (log-probability of the sampled token, ((token id, log-probability), ...) of the most likely alternatives)
TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class StepOutput:
    """Rank 0's answer: one sampled token per row with ``sample`` set, in row order. Other ranks return ().
    ``logprobs``: empty unless a row asked; then one entry per sampled row (None for rows that did not ask)."""

    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob | None, ...] = ()
    # per row asking for prompt logprobs: (seq_id, position of its first entry, an entry per prompt token from there)
    prompt_logprobs: tuple[tuple[str, int, tuple[TokenLogprob, ...]], ...] = ()


@dataclass
class LoadReport:
    """What one rank reports after loading its shard and allocating its KV cache."""

    rank: int
    load_s: float
    peak_rss_mb: float
    rss_mb: float
    num_params: int
    num_kv_blocks: int = 0  # KV blocks this rank's budget holds (the engine uses the smallest over ranks)
    kv_block_bytes: int = 0  # bytes of one block on this rank (its share of heads, every layer, keys + values)
    kv_block_size: int = 16  # tokens per block
    weight_bytes: int = 0  # bytes of this rank's weights as stored (quantized ones packed)
    decode_mode: str = "eager"  # how decode steps run: eager | cuda_graphs (raytp.gang.static_decode)
    decode_warm_up_s: float = 0.0  # start-up seconds spent capturing/compiling decode steps (part of load_s)
    attention_backend: str = "sdpa"  # raytp.gang.attention backend of this rank (legacy: transformers 4.x adapter)
