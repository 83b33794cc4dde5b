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
    plan: Any = field(default=None)  # the backend's own per-step plan (``AttentionBackend.prepare``), or None
    # a fixed-shape step (``attention.shapes.TokenBuckets``): tokens past the last row's end and empty rows are padding
    padded: bool = False


def build_on_device(layout: Layout, block_size: int, tables: torch.Tensor, slots: list[int]) -> AttentionMetadata:
    """The metadata of a step's rows from the rank's persistent device block tables (row ``slots[r]`` of ``tables``
    is row r's sequence): one small host-to-device copy of per-row numbers, everything per token (positions,
    slot mapping, fresh blocks) and the step's block tables computed on the device. Host work is per row, not per
    token or per block."""
    device = tables.device
    num_rows, num_tokens = len(layout), sum(n for n, _, _ in layout)
    qlens = [n for n, _, _ in layout]
    lens = [start + n for n, start, _ in layout]
    used = [-(-length // block_size) for length in lens]  # blocks written so far: the rest may be unwritten
    per_row = torch.tensor([qlens, [start for _, start, _ in layout], lens, used, slots], dtype=torch.int32)
    qlen, start, seq_lens, used_t, slot = per_row.to(device, non_blocking=True).unbind(0)
    query_start_loc = torch.zeros(num_rows + 1, dtype=torch.int32, device=device)
    query_start_loc[1:] = torch.cumsum(qlen, 0, dtype=torch.int32)
    row = torch.repeat_interleave(torch.arange(num_rows, device=device), qlen, output_size=num_tokens)
    positions = (torch.arange(num_tokens, device=device) - query_start_loc[row] + start[row]).long()
    width = max(used)
    block_tables = tables.index_select(0, slot)[:, :width]
    block_tables = torch.where(torch.arange(width, device=device)[None, :] < used_t[:, None], block_tables, 0)
    block = block_tables[row, positions // block_size].long()
    return AttentionMetadata(
        query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables,
        slot_mapping=block * block_size + positions % block_size, positions=positions[None],
        # a fixed-size index (0, the null block, where no block starts): zeroing the null block again is harmless
        fresh_blocks=torch.where(positions % block_size == 0, block, 0),
        num_tokens=num_tokens, num_rows=num_rows,
    )


def build(layout: Layout, block_size: int, device) -> AttentionMetadata:
    """The metadata of a step's rows from host block tables: host lists turned into device tensors once (one copy
    per field). For the shape probe, tests and benchmarks; a rank's steps use ``build_on_device``."""
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
    )
