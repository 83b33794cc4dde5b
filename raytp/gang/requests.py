"""What a rank keeps of each live sequence between steps (its part of the persistent batch). No torch, no Ray.

``RankRequests.apply(step)`` drops the sequences that left, records the ones that joined, appends each row's new
blocks to its sequence's table, and returns the step's rows resolved against that state (``LiveRow``: what the
model runner and the sampler read). A live sequence's handle (small, unique among live sequences, reused by the
engine once a sequence has left) is also its row in the model runner's device block-table tensor, which
``take_table_writes`` keeps in step with the host tables (only the entries that changed). Under async scheduling
a decode row may arrive before the driver has seen its input token (``PENDING_TOKEN``): every rank samples the
same tokens and records them per handle (``record_sampled``), and ``apply`` fills such rows in from that record.
The scripted test gang keeps the same state with the same class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raytp.messages import PENDING_TOKEN, SamplingParams, StepInput


@dataclass
class _Live:
    seq_id: str
    params: SamplingParams
    num_prompt_tokens: int
    table: list[int]
    handle: int  # also its row of the device block tables
    history: list[int] = field(default_factory=list)  # tokens computed so far, only if params.needs_history


@dataclass(frozen=True)
class LiveRow:
    """A step's row with its sequence's state: the old full-row view, made on the rank from the deltas."""

    seq_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: list[int]  # the rank's own list (appended in place as the sequence grows)
    slot: int  # the sequence's row of the device block tables (its handle)
    sample: bool
    params: SamplingParams
    num_prompt_tokens: int = 0
    history: tuple[int, ...] = ()  # prompt + output before this row's tokens, only if params.needs_history
    prompt_next: int | None = None
    allowed: bytes | None = None

    @property
    def prompt_targets(self) -> tuple[int, ...]:
        """Prompt logprobs (echo): the prompt tokens this chunk's positions score, in order (the logits at
        position p score the token at p + 1, for every p + 1 inside the prompt); () if the row did not ask."""
        if self.params.prompt_logprobs is None or self.start_pos + 1 >= self.num_prompt_tokens:
            return ()
        count = min(len(self.token_ids), self.num_prompt_tokens - 1 - self.start_pos)
        return (self.token_ids[1:] + (self.prompt_next,))[:count]


class RankRequests:
    def __init__(self):
        self.live: dict[int, _Live] = {}  # by handle
        self.num_slots = 0  # 1 + the largest handle seen (the device tables need at least this many rows)
        self._writes: list[tuple[int, int, int]] = []  # (slot, column, block) since take_table_writes
        self.last_sampled: dict[int, int] = {}  # by handle: the token sampled for it last

    def record_sampled(self, handles, tokens) -> None:
        self.last_sampled.update(zip(handles, tokens))

    def apply(self, step: StepInput) -> list[LiveRow]:
        """Update the state by ``step`` and return its rows; a row waiting on a pending token takes what
        ``record_sampled`` recorded for its sequence."""
        for handle in step.finished:
            self.live.pop(handle, None)
            self.last_sampled.pop(handle, None)
        for new in step.new_requests:
            self.num_slots = max(self.num_slots, new.handle + 1)
            s = self.live[new.handle] = _Live(new.seq_id, new.params, new.num_prompt_tokens, [], new.handle,
                                              list(new.history))
            self._extend(s, new.block_table)
        rows = []
        for r in step.rows:
            s = self.live[r.handle]
            self._extend(s, r.new_blocks)
            token_ids = r.token_ids
            if token_ids and token_ids[0] == PENDING_TOKEN:
                token_ids = (self.last_sampled[r.handle],)
            keeps_history = s.params.needs_history
            rows.append(LiveRow(s.seq_id, token_ids, r.start_pos, s.table, s.handle, r.sample, s.params,
                                s.num_prompt_tokens, tuple(s.history) if keeps_history and r.sample else (),
                                r.prompt_next, r.allowed))
            if keeps_history:
                s.history.extend(token_ids)
        return rows

    def take_table_writes(self) -> list[tuple[int, int, int]]:
        """The (slot, column, block) entries written since the last call, for the device mirror."""
        writes, self._writes = self._writes, []
        return writes

    def _extend(self, s: _Live, blocks) -> None:
        self._writes.extend((s.handle, len(s.table) + i, b) for i, b in enumerate(blocks))
        s.table.extend(blocks)
