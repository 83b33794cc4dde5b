"""The engine's two seams: what it offers the server above (``EngineClient``) and what it needs from the
gang below (``Executor``). Both are ``typing.Protocol``s, so a test can put a scripted executor under the
real engine, or anything else that keeps these contracts under the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from raytp.messages import LoadReport, SamplingParams, StepInput, StepOutput


@dataclass
class RequestOutput:
    """One streamed delta of a request. The last one has ``finish_reason`` set."""

    request_id: str
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    logprobs: list | None = None  # one TokenLogprob per token_ids entry, when the request asked for logprobs
    prompt_logprobs: list | None = None  # first output only, if asked: a TokenLogprob per prompt token but the first

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStatus:
    """A snapshot for ``/health``: requests in a batch slot, requests queued, requests ended by reason, KV cache."""

    num_running: int
    num_waiting: int
    num_finished: dict[str, int] = field(default_factory=dict)
    kv_cache_usage: float = 0.0  # fraction of KV blocks held by requests
    kv_cache_tokens: int = 0  # tokens the whole KV cache holds
    num_preemptions: int = 0  # requests preempted since start (KV blocks ran out; recomputed later)
    prefix_cache_hit_rate: float = 0.0  # prompt tokens found in the prefix cache / prompt tokens looked up
    prefix_cache_hit_tokens: int = 0  # prompt tokens found in the prefix cache so far


class Executor(Protocol):
    """Drives a gang of ranks. Every method but ``shutdown`` raises ``EngineDeadError`` once the gang failed
    (a dead rank, a worker exception, a stalled collective); a failed gang is never used again. ``start`` runs on
    the engine's caller's event loop (a Serve replica's: its placement group is that task's), ``step`` on the engine
    core's loop (another thread), ``pids`` on either; ``shutdown`` from any thread."""

    async def start(self) -> list[LoadReport]:
        """Start every rank, join the process group and load the model; one report per rank, in rank order."""

    async def step(self, step: StepInput) -> StepOutput:
        """Send ``step`` to every rank (identically) and return rank 0's output."""

    async def pids(self) -> list[int]:
        """Process ids of the ranks, in rank order."""

    async def probe(self) -> None:
        """Ask every rank whether it is alive (between steps too, on the caller's loop): a rank that died or
        stopped answering while the gang was idle is found here, not by the next request. Raises
        ``EngineDeadError`` (and marks the gang dead) if one did."""

    def shutdown(self) -> None:
        """Stop every rank and free what the gang holds. Idempotent; never raises."""


class EngineClient(Protocol):
    """What the server (``raytp.serve.server.LLMServer``) needs from an engine."""

    load_reports: list[LoadReport]

    async def start(self) -> None:
        """Bring the engine up; return once it has served a warm-up request. Raises if it cannot start."""

    def generate(self, request_id: str, prompt_ids: tuple[int, ...],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield deltas until one has ``finish_reason``; closing the iterator early aborts the request.
        Raises ``EngineDeadError`` (the gang failed), ``QueueFullError`` (the waiting queue is at its bound)
        or ``InvalidRequestError`` (e.g. a request id already in use)."""

    def check_health(self) -> None:
        """Return if healthy; raise ``EngineDeadError`` once the engine can no longer serve."""

    async def probe(self) -> None:
        """``check_health``, and ask the gang itself (``Executor.probe``): a gang that died while idle fails the
        engine here (its waiters, ``wait_dead``) rather than the next request that reaches it."""

    async def wait_dead(self) -> Exception:
        """Return the error once the engine has failed; never returns while it is healthy."""

    def status(self) -> EngineStatus:
        """Counts for ``/health``."""

    async def worker_pids(self) -> list[int]:
        """Process ids of the gang's ranks."""

    def shutdown(self) -> None:
        """Fail every in-flight request and free the gang. Idempotent; safe from ``__del__``."""
