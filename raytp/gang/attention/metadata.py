"""One step's attention layout: built once per step on the rank, as tensors on the device, read by every layer.

The fields are vLLM's (``query_start_loc``, ``seq_lens``, ``block_tables``, ``slot_mapping``), so a kernel that
reads vLLM-style paged metadata reads ours. Rows are the step's sequences in order; row ``r``'s query tokens are
``query_start_loc[r] .. query_start_loc[r + 1]`` of the flat token order, at the positions just below
``seq_lens[r]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# (number of tokens to compute, position of the first, the sequence's block table), one per row in step order
Layout = list[tuple[int, int, tuple[int, ...]]]


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # int32 [R + 1]
    seq_lens: torch.Tensor  # int32 [R]: context length after this step (last query position + 1)
    block_tables: torch.Tensor  # int32 [R, W]: the blocks each row has written, padded with the null block 0
    slot_mapping: torch.Tensor  # int64 [T]: KV slot of each query token
    positions: torch.Tensor  # int64 [1, T]
    fresh_blocks: torch.Tensor | None  # int64 [F]: blocks whose first slot is written this step
    num_tokens: int
    num_rows: int
    decode_only: bool  # every row computes one token
    plan: Any = field(default=None)  # the backend's own per-step plan (``AttentionBackend.prepare``), or None


def build(layout: Layout, block_size: int, device) -> AttentionMetadata:
    """The metadata of a step's rows: host lists turned into device tensors once (one copy per field)."""
    positions, slots, fresh, starts, lens, tables = [], [], [], [0], [], []
    for n, start, table in layout:
        pos = range(start, start + n)
        positions.extend(pos)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        fresh.extend(table[p // block_size] for p in pos if p % block_size == 0)
        starts.append(starts[-1] + n)
        lens.append(start + n)
        tables.append(table[:-(-(start + n) // block_size)])  # only written blocks: the rest may be unwritten
    width = max((len(t) for t in tables), default=1)
    i32 = dict(dtype=torch.int32, device=device)
    i64 = dict(dtype=torch.long, device=device)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, **i32),
        seq_lens=torch.tensor(lens, **i32),
        block_tables=torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], **i32),
        slot_mapping=torch.tensor(slots, **i64),
        positions=torch.tensor([positions], **i64),
        fresh_blocks=torch.tensor(fresh, **i64) if fresh else None,
        num_tokens=starts[-1],
        num_rows=len(layout),
        decode_only=all(n == 1 for n, _, _ in layout),
    )
