"""Small typed messages crossing the engine / executor / worker seam (plain, picklable, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class RequestOutput:
    """One streamed delta of a request. The last one has ``finish_reason`` set."""

    request_id: str
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class LoadReport:
    """What one rank reports after loading its shard."""

    rank: int
    load_s: float
    peak_rss_mb: float
    rss_mb: float
    num_params: int
    extra: dict = field(default_factory=dict)
