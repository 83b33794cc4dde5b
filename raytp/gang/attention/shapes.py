"""Fixed step shapes: how a backend's steps are padded to a few *buckets*, so each bucket can be captured once
as a graph and replayed (``raytp.gang.graph_runner``). The backend chooses the policy (``AttentionBackend.shapes``):

* ``TokenBuckets`` — for a backend that attends ragged rows in one launch per layer (the triton kernel, whose
  grid depends only on the token and row counts): *whole* steps, prompt chunks beside decode rows, padded to a
  token bucket T' (1, 2, 4, ... ``max_tokens``) with R' = min(T', ``max_rows``) rows — a dozen graphs in all
  (vLLM's full-graph scheme for its unified Triton attention). Padding never changes a real token: padding rows
  are empty (no query token, context 0: the kernel's programs for them return at once); padding tokens belong to
  no row (the kernel writes nothing for them, so attention output starts as zeros, ``meta.padded``) and write
  their keys to slot 0 of the null block, which no row reads unmasked. Logits are kept at each row's last token.
* ``DecodeBuckets`` — for a backend that is graph-safe on decode-only steps (sdpa): one token per sampled row,
  padded to a batch bucket × a table-width bucket. Padding rows are token 0 at position 0 writing slot 0 of the
  null block; padded table entries point at the null block and are masked.

Every bucket keeps one ``AttentionMetadata`` over views of persistent buffers, so the tensors a graph was captured
with are the ones every replay reads; ``load`` writes a step's rows into those buffers (built in place, once).
Steps a policy does not accept (prompt logprobs, beyond the largest bucket) run eagerly.
"""

from __future__ import annotations

import torch

from raytp.gang.attention.metadata import AttentionMetadata


def buckets(limit: int) -> list[int]:
    """Powers of two below ``limit``, then ``limit``: the padded sizes a value up to ``limit`` is rounded to."""
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_for(n: int, sizes: list[int]) -> int | None:
    return next((s for s in sizes if s >= n), None)


class StepShapes:
    """A bucket policy over persistent device buffers. ``keys()``: every bucket (captured at start-up);
    ``accepts(rows)``: a step's bucket or None (eager); ``load(rows, key, tables)``: write the step into the buffers
    (``tables``: the rank's device block tables, row ``r.slot`` for each row); ``model_inputs(key)``: the keyword
    arguments of the model call over the buffers, whose logits row i is row i's (``num_rows`` of them, padding
    after)."""

    def __init__(self, block_size: int, device: str):
        self.block_size = block_size
        self.device = device

    def keys(self) -> list:
        raise NotImplementedError

    def accepts(self, rows):
        raise NotImplementedError

    def load(self, rows, key, tables: torch.Tensor) -> None:
        raise NotImplementedError

    def model_inputs(self, key) -> dict:
        raise NotImplementedError


class TokenBuckets(StepShapes):
    """Whole steps of up to ``max_tokens`` tokens in up to ``max_rows`` rows, tables up to ``max_blocks`` wide."""

    def __init__(self, block_size: int, device: str, *, max_tokens: int, max_rows: int, max_blocks: int):
        super().__init__(block_size, device)
        self.max_rows = max_rows
        self.sizes = buckets(max_tokens)
        long = dict(dtype=torch.long, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.ids = torch.zeros((1, max_tokens), **long)
        self.positions = torch.zeros((1, max_tokens), **long)
        self.slots = torch.zeros(max_tokens, **long)
        self.query_start_loc = torch.zeros(max_rows + 1, **i32)  # all rows empty: the dummy step of the capture
        self.seq_lens = torch.zeros(max_rows, **i32)
        self.tables = torch.zeros((max_rows, max_blocks), **i32)
        self.keep = torch.zeros(max_rows, **long)
        self.columns = torch.arange(max_blocks, device=device)
        self._metas = {t: AttentionMetadata(
            query_start_loc=self.query_start_loc[:self._rows(t) + 1], seq_lens=self.seq_lens[:self._rows(t)],
            block_tables=self.tables[:self._rows(t)], slot_mapping=self.slots[:t], positions=self.positions[:, :t],
            fresh_blocks=None, num_tokens=t, num_rows=self._rows(t), padded=True) for t in self.sizes}

    def _rows(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_rows)

    def keys(self) -> list[int]:
        return self.sizes

    def accepts(self, rows) -> int | None:
        if len(rows) > self.max_rows or any(r.prompt_targets for r in rows):
            return None
        return bucket_for(sum(len(r.token_ids) for r in rows), self.sizes)

    def load(self, rows, key: int, tables: torch.Tensor) -> None:
        t, r, bs = key, self._rows(key), self.block_size
        m = len(rows)
        qlens = [len(row.token_ids) for row in rows]
        n = sum(qlens)
        used = [-(-(row.start_pos + q) // bs) for row, q in zip(rows, qlens)]  # blocks written once this step ran
        # one host-to-device copy: the per-row numbers, then the flat token ids
        host = torch.tensor([*qlens, *(row.start_pos for row in rows), *used, *(row.slot for row in rows),
                             *(tok for row in rows for tok in row.token_ids)], dtype=torch.long)
        dev = host.to(self.device, non_blocking=True)
        qlen, start, used_t, slot = dev[:4 * m].view(4, m)
        self.ids[0, :n].copy_(dev[4 * m:])
        self.ids[0, n:t].zero_()
        qsl = self.query_start_loc
        torch.cumsum(qlen, 0, dtype=torch.int32, out=qsl[1:m + 1])  # (qsl[0] is always 0)
        qsl[m + 1:r + 1].fill_(n)  # empty padding rows
        self.seq_lens[:m].copy_(start + qlen)
        self.seq_lens[m:r].zero_()
        row_of = torch.repeat_interleave(torch.arange(m, device=self.device), qlen, output_size=n)
        pos = torch.arange(n, device=self.device) - qsl[row_of] + start[row_of]
        self.positions[0, :n].copy_(pos)
        self.positions[0, n:t].zero_()
        width = max(used)
        # only the blocks a row has written: the rest of its table row may be unwritten memory
        mine = tables.index_select(0, slot)[:, :width]
        self.tables[:m, :width].copy_(torch.where(self.columns[None, :width] < used_t[:, None], mine, 0))
        self.slots[:n].copy_(self.tables[row_of, pos // bs].long() * bs + pos % bs)
        self.slots[n:t].zero_()  # padding tokens write slot 0 of the null block
        self.keep[:m].copy_(qsl[1:m + 1] - 1)
        self.keep[m:r].zero_()

    def model_inputs(self, key: int) -> dict:
        return dict(input_ids=self.ids[:, :key], position_ids=self.positions[:, :key],
                    logits_to_keep=self.keep[:self._rows(key)], raytp_meta=self._metas[key])


class DecodeBuckets(StepShapes):
    """Decode steps of up to ``max_batch`` rows and ``max_blocks`` blocks per row (a batch × a width bucket)."""

    def __init__(self, block_size: int, device: str, *, max_batch: int, max_blocks: int):
        super().__init__(block_size, device)
        self.batch_sizes = buckets(max_batch)
        self.widths = buckets(max_blocks)
        long = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros((1, max_batch), **long)
        self.positions = torch.zeros((1, max_batch), **long)
        self.slots = torch.zeros(max_batch, **long)
        self.fresh = torch.zeros(max_batch, **long)
        self.tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device)
        self.ctx_lens = torch.ones(max_batch, dtype=torch.int32, device=device)  # the dummy step: token 0 at 0
        self.columns = torch.arange(max_blocks, device=device)
        self._metas = {(b, w): AttentionMetadata(
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=device), seq_lens=self.ctx_lens[:b],
            block_tables=self.tables[:b, :w], slot_mapping=self.slots[:b], positions=self.positions[:, :b],
            fresh_blocks=self.fresh[:b], num_tokens=b, num_rows=b)
            for b in self.batch_sizes for w in self.widths}

    def keys(self) -> list[tuple[int, int]]:
        return [(b, w) for b in self.batch_sizes for w in self.widths]

    def accepts(self, rows) -> tuple[int, int] | None:
        if not all(len(r.token_ids) == 1 and r.sample for r in rows):
            return None
        b = bucket_for(len(rows), self.batch_sizes)
        w = bucket_for(max(-(-(r.start_pos + 1) // self.block_size) for r in rows), self.widths)
        return None if b is None or w is None else (b, w)

    def load(self, rows, key: tuple[int, int], tables: torch.Tensor) -> None:
        b, w = key
        bs, n = self.block_size, len(rows)
        pad = [0] * (b - n)
        pos = [r.start_pos for r in rows]
        host = torch.tensor([
            [r.token_ids[0] for r in rows] + pad,
            pos + pad,
            [r.block_table[p // bs] * bs + p % bs for r, p in zip(rows, pos)] + pad,
            [r.block_table[p // bs] if p % bs == 0 else 0 for r, p in zip(rows, pos)] + pad,
            [p + 1 for p in pos] + [1] * (b - n),
            [-(-(p + 1) // bs) for p in pos] + pad,  # blocks written: the rest of a table row may be unwritten
            [r.slot for r in rows] + pad,
        ], dtype=torch.long).to(self.device, non_blocking=True)
        self.ids[0, :b].copy_(host[0])
        self.positions[0, :b].copy_(host[1])
        self.slots[:b].copy_(host[2])
        self.fresh[:b].copy_(host[3])
        self.ctx_lens[:b].copy_(host[4])
        mine = tables.index_select(0, host[6])[:, :w]
        self.tables[:b, :w].copy_(torch.where(self.columns[None, :w] < host[5][:, None], mine, 0))

    def model_inputs(self, key: tuple[int, int]) -> dict:
        b, _ = key
        return dict(input_ids=self.ids[:, :b], position_ids=self.positions[:, :b], logits_to_keep=0,
                    raytp_meta=self._metas[key])
