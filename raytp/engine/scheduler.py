"""Which sequences run next. Pure Python: no torch, no Ray, no devices.

Every step the scheduler emits one ``SchedulerOutput``: rows to drop on every rank
(finished or aborted since the last step), then either new rows to prefill or one
decode step over all running rows. The row order is the workers' order: running rows
keep their order, new rows are appended.

``ContinuousBatchScheduler`` (default) schedules per iteration, as vLLM and TGI do:
waiting requests join the running batch as soon as there is a free slot, and finished
ones leave at once. A prefill step admits waiting prompts up to ``max_num_batched_tokens``
tokens in total (one prompt always fits) and never runs twice in a row while rows are
decoding, so a burst of long prompts stalls running streams by at most one prefill
step per decode step.

``StaticBatchScheduler`` is upstream DeepSpeed's serving policy, kept for comparison:
up to ``max_num_seqs`` requests start together and the batch runs until all are done.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from raytp.errors import QueueFullError
from raytp.messages import SamplingParams, SeqInput


@dataclass
class Sequence:
    """Engine-side state of one request."""

    seq_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival_s: float = field(default_factory=time.monotonic)
    last_token_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_input(self) -> SeqInput:
        return SeqInput(self.seq_id, self.prompt_ids, self.params)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's command. ``kind``: 'prefill' (``seqs`` are new rows), 'decode' (``seqs`` are all rows),
    'release' (only drop ``finished_ids``) or 'idle'. ``finished_ids`` are dropped on every rank first."""

    kind: str
    seqs: tuple[Sequence, ...] = ()
    finished_ids: tuple[str, ...] = ()


class _Queue:
    """The bounded waiting queue and abort handling both policies share."""

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
        """Drop a waiting sequence, or mark a running one finished so the next step frees its row."""
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                return
        for seq in self.running:
            if seq.seq_id == seq_id and not seq.finished:
                seq.finish_reason = "abort"

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


class ContinuousBatchScheduler(_Queue):
    def __init__(self, max_num_seqs: int, max_queue_size: int, max_num_batched_tokens: int):
        super().__init__(max_num_seqs, max_queue_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self._last_was_prefill = False

    def schedule(self) -> SchedulerOutput:
        finished = tuple(s.seq_id for s in self.running if s.finished)
        self.running = [s for s in self.running if not s.finished]
        new: list[Sequence] = []
        may_prefill = not (self._last_was_prefill and self.running)
        if may_prefill:
            budget = self.max_num_batched_tokens
            while self.waiting and len(self.running) + len(new) < self.max_num_seqs:
                n = len(self.waiting[0].prompt_ids)
                if new and n > budget:
                    break
                budget -= n
                new.append(self.waiting.popleft())
        self._last_was_prefill = bool(new)
        if new:
            self.running += new
            return SchedulerOutput("prefill", tuple(new), finished)
        if self.running:
            return SchedulerOutput("decode", tuple(self.running), finished)
        return SchedulerOutput("release", (), finished) if finished else SchedulerOutput("idle")


class StaticBatchScheduler(_Queue):
    def schedule(self) -> SchedulerOutput:
        if self.running and not all(s.finished for s in self.running):
            return SchedulerOutput("decode", tuple(self.running))
        finished = tuple(s.seq_id for s in self.running)
        self.running = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        if self.running:
            return SchedulerOutput("prefill", tuple(self.running), finished)
        return SchedulerOutput("release", (), finished) if finished else SchedulerOutput("idle")


def make_scheduler(policy: str, max_num_seqs: int, max_queue_size: int, max_num_batched_tokens: int):
    if policy == "static":
        return StaticBatchScheduler(max_num_seqs, max_queue_size)
    return ContinuousBatchScheduler(max_num_seqs, max_queue_size, max_num_batched_tokens)
