"""Which tokens of which sequences run next, and in which KV blocks. Pure Python: no torch, no Ray.

Every step the scheduler emits one ``SchedulerOutput``: a flat list of (sequence, number of tokens)
rows, each computing its next tokens at its next positions, and the ids of sequences that ended.
Rows carry no padding: a decoding row computes one token, a prefilling row a chunk of its prompt.

``ContinuousBatchScheduler`` (default) is vLLM's: each step first gives every running sequence its
next tokens (one for a decoding row, the next chunk of a prompt still being prefilled), then admits
waiting sequences, all under ``max_num_batched_tokens`` tokens per step. A long prompt is thus
prefilled in chunks across steps while the running streams decode a token every step, and one
step's work (hence its duration) is bounded. KV memory is the paged cache of ``BlockManager``:
a sequence is admitted only when its blocks fit; when a running sequence needs a block and none is
free, the newest running sequence is preempted — its blocks are freed and it goes back to the front
of the queue, to be recomputed (prompt + output so far) when blocks free up; with prefix caching
its own freed blocks usually make that recompute cheap. Nothing is dropped, nothing runs out of memory.

``StaticBatchScheduler`` is upstream DeepSpeed's serving policy, kept for comparison: up to
``max_num_seqs`` requests start together (each reserving blocks for prompt + ``max_tokens``, whole
prompts in one step) and the batch runs until all are done.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from raytp.engine.kv_cache import BlockManager, KVState
from raytp.errors import InvalidRequestError, QueueFullError
from raytp.messages import SamplingParams


@dataclass
class Sequence:
    """Engine-side state of one request. ``token_ids`` = prompt + output so far; the first ``num_computed``
    of them have their keys and values in ``kv``'s blocks."""

    seq_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    finish_reason: str | None = None
    arrival_s: float = field(default_factory=time.monotonic)
    last_token_s: float | None = None
    scheduled_s: float | None = None  # first scheduled (end of its queueing)
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    kv: KVState = field(default_factory=KVState)
    num_preemptions: int = 0
    # tokens sampled by a step still running (async scheduling: 0 or 1): they count as known to the scheduler,
    # which can schedule their computation before the driver has seen them (the row carries PENDING_TOKEN)
    num_inflight: int = 0

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_pending(self) -> int:
        """Tokens known (or in flight) but not yet computed: the rest of the prompt, or the one token sampled
        last step."""
        return len(self.token_ids) + self.num_inflight - self.num_computed

    @property
    def ready(self) -> bool:
        """Whether a step may compute this sequence now. Not while its token is in flight if that token may be
        its last (max_tokens: the step would be wasted) or its grammar must see it first (the next step's mask)."""
        if not self.num_inflight:
            return True
        return not self.params.grammar and self.num_output_tokens + self.num_inflight < self.params.max_tokens

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step: ``rows`` (sequence, tokens to compute) in row order; ``finished_ids`` ended since the last
    step; ``preempted_ids`` preempted while scheduling it (their blocks freed). No rows and no ids: nothing to do."""

    rows: tuple[tuple[Sequence, int], ...] = ()
    finished_ids: tuple[str, ...] = ()
    preempted_ids: tuple[str, ...] = ()

    @property
    def num_preempted(self) -> int:
        return len(self.preempted_ids)

    @property
    def idle(self) -> bool:
        """Nothing computed and nobody left: a preemption alone is news for the ranks (they must drop the
        sequence's blocks before it rejoins with others)."""
        return not self.rows and not self.finished_ids and not self.preempted_ids


class _Scheduler:
    """The bounded waiting queue, the running set, the block manager and abort handling both policies share."""

    def __init__(self, kv: BlockManager, max_num_seqs: int, max_queue_size: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_queue_size = max_queue_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._departed: list[str] = []  # released since the last step: the ranks hear of them with the next one

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``. Raises ``InvalidRequestError`` if it could never fit in the KV cache, ``QueueFullError``
        if the waiting queue is at its bound."""
        need = len(seq.prompt_ids) + seq.params.max_tokens
        if need > self.kv.capacity_tokens:
            raise InvalidRequestError(
                f"this request needs up to {need} tokens of KV cache (prompt {len(seq.prompt_ids)} + max_tokens "
                f"{seq.params.max_tokens}) but the whole cache of this replica holds {self.kv.capacity_tokens}; "
                "shorten the prompt or lower max_tokens")
        if len(self.waiting) >= self.max_queue_size:
            raise QueueFullError(f"server is at capacity ({self.max_queue_size} requests waiting); retry later")
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> None:
        """Drop a waiting sequence, or mark a running one finished so the next step frees it."""
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                self.kv.free(seq.kv)
                return
        for seq in self.running:
            if seq.seq_id == seq_id and not seq.finished:
                seq.finish_reason = "abort"

    def drain(self) -> None:
        """Remove every sequence and free its blocks (used when the gang dies)."""
        for s in self.running + list(self.waiting):
            self.kv.free(s.kv)
        self.running, self.waiting = [], deque()

    def advance(self, out: SchedulerOutput) -> None:
        """``out`` is sent to the ranks: its rows' tokens count as computed from now on (the next step schedules
        what follows them; the ranks run steps in order)."""
        for seq, n in out.rows:
            seq.num_computed += n

    def commit(self, seq: Sequence) -> None:
        """Once ``seq``'s computed tokens are known to the driver: its full blocks become cacheable."""
        if not seq.finished and seq.kv.table:
            self.kv.commit(seq.kv, seq.token_ids, min(seq.num_computed, len(seq.token_ids)))

    def release_finished(self) -> None:
        """Free the blocks of every sequence that finished or was aborted, now (the engine calls it as soon as a
        step's outputs are known, so the cache's usage is current); the next step tells the ranks."""
        # a preempted sequence whose token in flight finished it is done without running again (it holds no blocks)
        if any(s.finished for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.finished)
        for s in self.running:
            if s.finished:
                self.kv.free(s.kv)
                self._departed.append(s.seq_id)
        self.running = [s for s in self.running if not s.finished]

    def _take_departed(self) -> tuple[str, ...]:
        departed, self._departed = tuple(self._departed), []
        return departed

    def _admit(self, seq: Sequence, num_tokens) -> int | None:
        """Take ``seq``'s cached prefix and blocks for its first chunk (at most ``num_tokens`` tokens, or all
        of them if None) plus ``reserve`` more tokens; return the chunk's length, or None (nothing held)."""
        if not seq.kv.table and seq.params.prompt_logprobs is None:  # prompt logprobs need every position computed
            seq.num_computed = self.kv.reuse_prefix(seq.kv, seq.token_ids)
        n = seq.num_pending if num_tokens is None else self._chunk(seq.num_pending, num_tokens)
        if n and self.kv.allocate(seq.kv, seq.num_computed + n + self._reserve(seq)):
            if self.kv.enable_prefix_caching:
                self.kv.record_lookup(len(seq.token_ids), seq.num_computed)
            return n
        self.kv.free(seq.kv)
        seq.num_computed = 0
        return None

    def _reserve(self, seq: Sequence) -> int:
        return 0

    def _chunk(self, pending: int, budget: int) -> int:
        """How many of a sequence's ``pending`` tokens to compute in a step with ``budget`` tokens left (0: none this
        step). A prompt is never cut so that a chunk of one token computes part of it (here or left for the next
        step): a one-token row takes M = 1 paths (a GEMV, a decode row's attention) that round differently from
        the same token inside a longer chunk, and a greedy answer would depend on how the prompt was cut."""
        n = min(pending, budget)
        if pending == 1:
            return n
        if pending - n == 1:
            n -= 1  # leave two tokens, not one
        if n == 1:  # wait for a fuller budget next step, unless no step ever has more
            return 0 if budget < self.max_num_batched_tokens else min(pending, budget)
        return n

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(not s.finished for s in self.running)


class ContinuousBatchScheduler(_Scheduler):
    def schedule(self) -> SchedulerOutput:
        self.release_finished()
        finished = self._take_departed()
        budget = self.max_num_batched_tokens
        rows: list[tuple[Sequence, int]] = []
        preempted: list[str] = []
        # 1. Running sequences first, oldest first: a token each (or their next prompt chunk).
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if not seq.ready:
                i += 1
                continue
            n = self._chunk(seq.num_pending, budget)
            if n == 0:
                i += 1
                continue
            while not self.kv.allocate(seq.kv, seq.num_computed + n):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                rows.append((seq, n))
                budget -= n
                i += 1
                continue
            break
        # 2. Then waiting ones, in arrival order, while tokens, slots and blocks last (not in a step that had to
        # preempt: blocks are short).
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_inflight:  # preempted while its last token was in flight: recompute it once it is known
                break
            n = self._admit(seq, budget)
            if n is None:
                break
            self.running.append(self.waiting.popleft())
            rows.append((seq, n))
            budget -= n
        return SchedulerOutput(tuple(rows), finished, tuple(preempted))

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.kv)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)


class StaticBatchScheduler(_Scheduler):
    def schedule(self) -> SchedulerOutput:
        live = [s for s in self.running if not s.finished]
        if live:  # the batch runs on; blocks of its finished sequences are freed only if the engine released them
            return SchedulerOutput(tuple((s, s.num_pending) for s in live), self._take_departed())
        self.release_finished()
        finished = self._take_departed()
        rows = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            n = self._admit(self.waiting[0], None)
            if n is None:
                break
            seq = self.waiting.popleft()
            self.running.append(seq)
            rows.append((seq, n))
        return SchedulerOutput(tuple(rows), finished)

    def _reserve(self, seq: Sequence) -> int:
        return seq.params.max_tokens  # a static batch never grows past what it reserved: no preemption


@dataclass(frozen=True)
class SchedulerConfig:
    """A scheduling policy and its limits; ``build`` makes the scheduler once the gang says how many KV blocks
    every rank holds."""

    policy: str = "continuous"  # continuous | static
    max_num_seqs: int = 8
    max_queue_size: int = 256
    max_num_batched_tokens: int = 512
    block_size: int = 16
    enable_prefix_caching: bool = True
    async_scheduling: bool = True  # the engine sends a step while the one before runs (continuous policy only)

    @classmethod
    def of(cls, config) -> SchedulerConfig:
        """From a ``ResolvedConfig``."""
        return cls(config.scheduling, config.max_num_seqs, config.max_queue_size, config.max_num_batched_tokens,
                   config.block_size, config.enable_prefix_caching, config.async_scheduling)

    @property
    def pipelined(self) -> bool:
        return self.async_scheduling and self.policy == "continuous"

    def build(self, num_blocks: int):
        cls = StaticBatchScheduler if self.policy == "static" else ContinuousBatchScheduler
        kv = BlockManager(num_blocks, self.block_size, self.enable_prefix_caching)
        return cls(kv, self.max_num_seqs, self.max_queue_size, self.max_num_batched_tokens)
