"""Which sequences run next. Pure Python: no torch, no Ray, no devices.

``StaticBatchScheduler`` batches simply: when the gang is idle it admits up to
``max_num_seqs`` waiting sequences as one batch, decodes that batch until every
sequence in it has finished, then starts the next. It is the replaceable piece
an iteration-level scheduler swaps out; the engine only sees ``SchedulerOutput``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from raytp.engine.types import SamplingParams, SeqInput
from raytp.errors import QueueFullError


@dataclass
class Sequence:
    """Engine-side state of one request."""

    seq_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival_s: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_input(self) -> SeqInput:
        return SeqInput(self.seq_id, self.prompt_ids, self.params)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's command. ``kind``: 'prefill' (start batch ``seqs``), 'decode' (step ``seqs``),
    'release' (free the finished batch's cache) or 'idle' (nothing to do)."""

    kind: str
    seqs: tuple[Sequence, ...] = ()


class StaticBatchScheduler:
    def __init__(self, max_num_seqs: int, max_queue_size: int):
        self.max_num_seqs = max_num_seqs
        self.max_queue_size = max_queue_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; raise ``QueueFullError`` if the waiting queue is at its bound."""
        if len(self.waiting) >= self.max_queue_size:
            raise QueueFullError(f"server is at capacity ({self.max_queue_size} requests waiting); retry later")
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> None:
        """Drop a waiting sequence, or mark a running one finished so its result is ignored."""
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                return
        for seq in self.running:
            if seq.seq_id == seq_id and not seq.finished:
                seq.finish_reason = "abort"

    def schedule(self) -> SchedulerOutput:
        if self.running and not all(s.finished for s in self.running):
            return SchedulerOutput("decode", tuple(self.running))
        had_batch = bool(self.running)
        self.running = []
        if self.waiting:
            while self.waiting and len(self.running) < self.max_num_seqs:
                self.running.append(self.waiting.popleft())
            return SchedulerOutput("prefill", tuple(self.running))  # a new prefill replaces the old batch's cache
        return SchedulerOutput("release") if had_batch else SchedulerOutput("idle")

    def drain(self) -> list[Sequence]:
        """Remove and return every unfinished sequence (used when the gang dies)."""
        seqs = [s for s in self.running if not s.finished] + list(self.waiting)
        self.running, self.waiting = [], deque()
        return seqs

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(not s.finished for s in self.running)
