"""The driver's mirror of the ranks' persistent batch: a scheduled step → the ``StepInput`` every rank gets.
Pure Python: no torch, no Ray.

Ranks keep each live sequence's parameters and block table from the step it joins until the step that says it
left (``raytp.gang.requests``). ``StepBuilder`` remembers what they hold — per sequence a handle (a small number,
reused once the sequence has left) and how many of its blocks they know — so each step carries only deltas
(vLLM v1's new / cached request data): a ``NewRequest`` once per admission, per row its tokens and the blocks it
gained, and the handles of sequences that left. A row's input token that a step still in flight will sample
(async scheduling) is ``PENDING_TOKEN``; a sampled row of a constrained sequence carries its grammar's mask.
"""

from __future__ import annotations

from collections.abc import Callable

from raytp.engine.scheduler import SchedulerOutput, Sequence
from raytp.messages import PENDING_TOKEN, NewRequest, RowInput, StepInput


class StepBuilder:
    """``allowed(seq_id)``: the packed bitmask of the tokens a constrained sequence may sample next (asked only for
    sampled rows of requests with a grammar)."""

    def __init__(self, allowed: Callable[[str], bytes | None]):
        self._allowed = allowed
        self._on_ranks: dict[str, tuple[int, int]] = {}  # seq_id -> (handle, blocks of its table the ranks know)
        self._leaving: list[int] = []  # handles of sequences gone since the last step sent
        self._free: list[int] = []  # handles the ranks no longer use
        self._num_handles = 0

    @property
    def num_on_ranks(self) -> int:
        return len(self._on_ranks)

    def build(self, out: SchedulerOutput) -> tuple[StepInput | None, list[Sequence]]:
        """The step for ``out`` and the sequences it samples a token for, in row order. (None, []) when ``out``
        computes nothing: its departures then ride on the next step that does (never a round trip of their own).
        Call once per scheduled step, in order: it records what the ranks will hold after this step."""
        for seq_id in out.finished_ids + out.preempted_ids:
            left = self._on_ranks.pop(seq_id, None)
            if left is not None:
                self._leaving.append(left[0])
        if not out.rows:
            return None, []
        new, rows, sampled = [], [], []
        for seq, n in out.rows:
            row, joined = self._row(seq, n)
            rows.append(row)
            if joined is not None:
                new.append(joined)
            if row.sample:
                sampled.append(seq)
        step = StepInput(tuple(new), tuple(rows), tuple(self._leaving))
        self._free += self._leaving  # the ranks drop them before reading this step's arrivals; reused from the next
        self._leaving = []
        return step, sampled

    def _row(self, seq: Sequence, n: int) -> tuple[RowInput, NewRequest | None]:
        start, table = seq.num_computed, seq.kv.table
        known = tuple(seq.token_ids[start:start + n])
        tokens = known + (PENDING_TOKEN,) * (n - len(known))  # the token still in flight, if any
        sample = start + n == len(seq.token_ids) + seq.num_inflight
        handle, num_known = self._on_ranks.get(seq.seq_id, (None, 0))
        joined = None
        if handle is None:  # joins the ranks' batch: what they keep of it, once
            handle = self._free.pop() if self._free else self._new_handle()
            history = tuple(seq.token_ids[:start]) if seq.params.needs_history else ()
            joined = NewRequest(seq.seq_id, handle, seq.params.for_ranks(), len(seq.prompt_ids), tuple(table),
                                history)
            num_known = len(table)
        self._on_ranks[seq.seq_id] = (handle, len(table))
        prompt_next = seq.prompt_ids[start + n] if start + n < len(seq.prompt_ids) else None
        allowed = self._allowed(seq.seq_id) if sample and seq.params.grammar else None
        return RowInput(handle, tokens, start, sample, tuple(table[num_known:]), prompt_next, allowed), joined

    def _new_handle(self) -> int:
        self._num_handles += 1
        return self._num_handles - 1
