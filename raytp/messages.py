"""Typed messages across the engine ⇄ gang seam: plain, picklable dataclasses, no torch, no Ray.

The engine sends every rank the same ``StepInput``; rank 0 answers with a ``StepOutput``.
Full prompt tokens travel once, in the step that prefills them; decode steps carry no
tokens at all (every rank already holds each row's last token).
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
class SeqInput:
    """What a rank needs to prefill one sequence: full prompt tokens once, never again."""

    seq_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class StepInput:
    """One engine step, identical for every rank. Applied in this order:

    1. drop the rows of ``finished_ids`` (finished or aborted since the last step);
    2. prefill ``new`` rows (appended in order) and sample each one's first token; or, if there are none,
    3. when ``decode`` is set, sample one token for every row, in row order.
    A step with only ``finished_ids`` releases rows and samples nothing."""

    finished_ids: tuple[str, ...] = ()
    new: tuple[SeqInput, ...] = ()
    decode: bool = False


@dataclass(frozen=True)
class StepOutput:
    """Rank 0's answer to a ``StepInput``: one sampled token per prefilled row (prefill) or per row (decode),
    in row order; empty for a release-only step. Other ranks return an empty output."""

    tokens: tuple[int, ...] = ()


@dataclass
class LoadReport:
    """What one rank reports after loading its shard."""

    rank: int
    load_s: float
    peak_rss_mb: float
    rss_mb: float
    num_params: int
