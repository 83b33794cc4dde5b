"""Decode steps on fixed shapes, so that, on CUDA, they can be captured as graphs once and replayed.

A decode step is one token per row with every row sampled. Its shapes change every step (rows join and
leave, contexts grow), and a captured CUDA graph replays only the shapes it was made for. So a decode step
is padded up to a *batch bucket* (1, 2, 4, 8, ... max_num_seqs rows) and its block tables up to a *width
bucket* (1, 2, 4, ... blocks of the longest context): never the sequence itself — each row still attends
exactly its own context (padded table entries point at the null block and are masked). Padding rows are
token 0 at position 0 writing slot 0 of the null block: that slot then holds finite garbage, which is
harmless because every read of the null block is masked.

Every bucket keeps one ``AttentionMetadata`` over views of persistent buffers, so the tensors a graph was
captured with are the same at every replay; a step copies its rows into the buffers and replays. Prefill
and mixed steps, and anything beyond the largest bucket, take the eager path. The attention is the rank's
backend (``raytp.gang.attention``), which must be ``graph_safe`` for capture. A backend that takes ragged rows
in one launch (the triton kernel) runs whole steps, mixed ones too, on fixed shapes instead
(``raytp.gang.static_step``); both share the capture (``FixedShapes``).
"""

from __future__ import annotations

import logging
import time

import torch

from raytp import platforms
from raytp.gang.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)


def buckets(limit: int) -> list[int]:
    """Powers of two below ``limit``, then ``limit``: the padded sizes a value up to ``limit`` is rounded to."""
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_for(n: int, sizes: list[int]) -> int | None:
    return next((s for s in sizes if s >= n), None)


class FixedShapes:
    """Steps on a fixed set of shapes (``bucket_keys``), each run by ``_model_forward(key)`` over persistent
    buffers. ``mode``: 'eager' (fixed shapes, no capture: the reference the graphs must equal, testable on CPU)
    or 'cuda_graphs' (each bucket captured as a graph at start-up by ``warm_up`` and replayed by ``_replay``)."""

    def __init__(self, model, backend: AttentionBackend, device: str, mode: str):
        self.model = model
        self.backend = backend
        self.pool = backend.pool
        self.device = device
        self.mode = mode
        self._graphs: dict = {}  # bucket -> (captured graph, its logits tensor)
        self.warm_up_s = 0.0

    def bucket_keys(self) -> list:
        raise NotImplementedError

    def _model_forward(self, key) -> torch.Tensor:
        raise NotImplementedError

    def _replay(self, key) -> torch.Tensor:
        """The bucket's logits: its graph replayed, or (eager) the forward run now."""
        if key in self._graphs:
            graph, logits = self._graphs[key]
            graph.replay()
            return logits
        return self._model_forward(key)

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Capture every bucket now (start-up), so no user request pays for it; returns the seconds. The buffers
        must hold a valid dummy step."""
        if self.mode == "eager":
            return 0.0
        start = time.perf_counter()
        g = platforms.get(torch.device(self.device).type).graphs()  # torch.cuda: CUDAGraph, graph, streams
        pool = g.graph_pool_handle()
        stream = g.Stream()
        stream.wait_stream(g.current_stream())
        with g.stream(stream):  # every bucket once outside capture: lazy inits, workspaces, kernel compilation
            for key in self.bucket_keys():
                self._model_forward(key)
        g.current_stream().wait_stream(stream)
        # largest first: smaller graphs reuse the memory of larger ones from the shared pool
        for key in reversed(self.bucket_keys()):
            graph = g.CUDAGraph()
            with g.graph(graph, pool=pool):
                logits = self._model_forward(key)
            self._graphs[key] = (graph, logits)
        g.synchronize()
        self.warm_up_s = time.perf_counter() - start
        logger.info("%s %s: %d buckets ready in %.1f s", type(self).__name__, self.mode, len(self._graphs),
                    self.warm_up_s)
        return self.warm_up_s


class StaticDecoder(FixedShapes):
    """Runs decode steps of up to ``max_batch`` rows and ``max_blocks`` blocks per row on bucketed fixed shapes
    (a batch bucket × a table-width bucket)."""

    def __init__(self, model, backend: AttentionBackend, device: str, *, max_batch: int, max_blocks: int,
                 mode: str):
        super().__init__(model, backend, device, mode)
        self.batch_sizes = buckets(max_batch)
        self.widths = buckets(max_blocks)
        long = dict(dtype=torch.long, device=device)
        self.ids = torch.zeros((1, max_batch), **long)
        self.positions = torch.zeros((1, max_batch), **long)
        self.slots = torch.zeros(max_batch, **long)
        self.fresh = torch.zeros(max_batch, **long)
        self.tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device)
        self.ctx_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.columns = torch.arange(max_blocks, device=device)
        self._metas = {(b, w): AttentionMetadata(
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=device), seq_lens=self.ctx_lens[:b],
            block_tables=self.tables[:b, :w], slot_mapping=self.slots[:b], positions=self.positions[:, :b],
            fresh_blocks=self.fresh[:b], num_tokens=b, num_rows=b)
            for b in self.batch_sizes for w in self.widths}
        self.ctx_lens.fill_(1)  # the buffers hold a valid dummy step (token 0 at position 0, null block) to capture

    def bucket_keys(self) -> list[tuple[int, int]]:
        return [(b, w) for b in self.batch_sizes for w in self.widths]

    def accepts(self, rows) -> tuple[int, int] | None:
        """The (batch, width) bucket of a step's rows, or None if the step is not a decode step that fits."""
        if not all(len(r.token_ids) == 1 and r.sample for r in rows):
            return None
        bs = self.pool.block_size
        b = bucket_for(len(rows), self.batch_sizes)
        w = bucket_for(max(-(-(r.start_pos + 1) // bs) for r in rows), self.widths)
        return None if b is None or w is None else (b, w)

    @torch.inference_mode()
    def run(self, rows, bucket: tuple[int, int], tables: torch.Tensor) -> torch.Tensor:
        """Logits [len(rows), V] of a decode step (writing each row's new KV into its blocks). ``tables``: the
        rank's device block tables, row ``r.slot`` for each row."""
        b, w = bucket
        bs = self.pool.block_size
        n = len(rows)
        ids = [r.token_ids[0] for r in rows] + [0] * (b - n)
        pos = [r.start_pos for r in rows] + [0] * (b - n)
        slots = [r.block_table[p // bs] * bs + p % bs for r, p in zip(rows, pos)] + [0] * (b - n)
        fresh = [r.block_table[p // bs] if p % bs == 0 else 0 for r, p in zip(rows, pos)] + [0] * (b - n)
        # only the blocks a row has written: the rest of its table may be unwritten memory (NaN × a masked 0 = NaN)
        used = [-(-(p + 1) // bs) for p in pos[:n]] + [0] * (b - n)
        ctx = [p + 1 for p in pos[:n]] + [1] * (b - n)
        seq_rows = [r.slot for r in rows] + [0] * (b - n)
        host = torch.tensor([ids, pos, slots, fresh, ctx, used, seq_rows], dtype=torch.long).to(self.device)
        self.ids[0, :b].copy_(host[0], non_blocking=True)
        self.positions[0, :b].copy_(host[1], non_blocking=True)
        self.slots[:b].copy_(host[2], non_blocking=True)
        self.fresh[:b].copy_(host[3], non_blocking=True)
        self.ctx_lens[:b].copy_(host[4], non_blocking=True)
        mine = tables.index_select(0, host[6])[:, :w]
        self.tables[:b, :w].copy_(torch.where(self.columns[None, :w] < host[5][:, None], mine, 0))
        return self._replay(bucket)[:n]

    def _model_forward(self, key: tuple[int, int]) -> torch.Tensor:
        b, w = key
        out = self.model(input_ids=self.ids[:, :b], position_ids=self.positions[:, :b], use_cache=False,
                         logits_to_keep=0, raytp_backend=self.backend, raytp_meta=self._metas[(b, w)])
        return out.logits[0]
