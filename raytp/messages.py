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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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


@dataclass(frozen=True)
class StepOutput:
    """Rank 0's answer: one sampled token per row with ``sample`` set, in row order. Other ranks return ()."""

    tokens: tuple[int, ...] = ()


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
