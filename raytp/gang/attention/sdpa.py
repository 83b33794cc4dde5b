"""The portable backend: torch's ``scaled_dot_product_attention`` over the paged blocks, on every device.

Rows are attended in three ways, cheapest first (the plan is made once per step, ``prepare``):
* a prompt's first chunk attends to its own keys (causal), no cache read;
* a row whose written blocks are consecutive in the pool (the block manager places sequences so they
  usually are) attends to a view of the pool, no copy;
* other rows gather their blocks and attend to exactly their context, as a view would hold it (same shape and
  layout, so the same numbers: which path a row takes depends on where the block manager put its blocks, e.g.
  whether its prefix came from the cache, and must not change its answer).
``tiled_prefill`` (the CPU's choice): a row's queries (n > 1) are computed in query tiles of ``PREFILL_TILE`` at fixed
absolute positions, each over exactly the keys up to its tile's end (``_prefill_tiles``), so a query's numbers
depend only on its position and its context, never on how the prompt was cut into chunks or which part of it came
from the prefix cache; otherwise torch's SDPA (its flash kernel on CPU tiles queries relative to the call, and rounds
a tile of one or two rows differently from the same rows in a larger tile: a cold prompt and the same prompt with a
cached prefix gave different greedy answers in float32).
``batch_decode``: every decode row goes to one batched gather + SDPA, padded to the longest row with the null
block and masked, consecutive or not — on a GPU one call per layer for all decode rows costs less than one small
kernel launch per row per layer.
``decode_kernel`` (the CPU's choice): every decode row goes to one call of a compiled loop over the paged blocks
(``attention.cpu_decode``), which neither copies nor upcasts the context; where it cannot be built (no C++
compiler) decode rows take the per-row paths, with a warning.
Decode-only metadata without a plan (the fixed-shape decode steps of ``attention.shapes.DecodeBuckets``) take the
batched path from the metadata's tensors alone, which is graph-safe.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from raytp.gang.attention.backend import AttentionBackend
from raytp.gang.attention.cpu_decode import PagedDecode, native_supported, write_and_decode
from raytp.gang.attention.kv_pool import KVPool
from raytp.gang.attention.metadata import AttentionMetadata, Layout
from raytp.gang.attention.shapes import DecodeBuckets

logger = logging.getLogger(__name__)


@dataclass
class _Plan:
    own: list[tuple[int, int]] = field(default_factory=list)  # (q start, q len)
    # (q start, q len, first slot, context length, causal mask or None)
    views: list[tuple[int, int, int, int, torch.Tensor | None]] = field(default_factory=list)
    # (q start, q len, context length, row, causal mask)
    gathers: list[tuple[int, int, int, int, torch.Tensor]] = field(default_factory=list)
    decode_q: torch.Tensor | None = None  # token index of each batched decode row
    decode_tables: torch.Tensor | None = None  # [B, W]
    decode_lens: torch.Tensor | None = None  # [B]
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, W * block_size] for SDPA (None: the kernel masks by lens)


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def __init__(self, pool: KVPool, batch_decode: bool = False, tiled_prefill: bool = False,
                 decode_kernel: bool = False, batch_invariant: bool = False):
        super().__init__(pool)
        self.batch_decode = batch_decode
        self.tiled_prefill = tiled_prefill
        # with the kernel, a step's one decode row still goes per row (it costs ~4 % less at batch 1 than the
        # kernel's call), unless a row must be computed the same way in any batch
        self.kernel_min_rows = 1 if batch_invariant else 2
        self.decode_kernel = PagedDecode.shared() if decode_kernel else None  # compiled at its first use
        if decode_kernel:  # the same loops traced into a compiled decode step, where one is compiled
            native = all(native_supported(keys) for keys in pool.keys if keys is not None)
            self.graph_decode = functools.partial(write_and_decode, block_size=pool.block_size, native=native)

    def shapes(self, *, max_tokens: int, max_rows: int, max_blocks: int) -> DecodeBuckets:
        """Decode-only steps: their metadata without a plan takes the batched path, from its tensors alone."""
        return DecodeBuckets(self.pool.block_size, self.pool.device, max_batch=max_rows, max_blocks=max_blocks)

    def prepare(self, meta: AttentionMetadata, layout: Layout) -> None:
        bs = self.pool.block_size
        device = meta.seq_lens.device
        plan = _Plan()
        decode_rows, offset = [], 0
        batched = self.batch_decode or (self.decode_kernel is not None and
                                        sum(n == 1 for n, _, _ in layout) >= self.kernel_min_rows)
        for row, (n, start, table) in enumerate(layout):
            ctx_len = start + n
            used = table[:-(-ctx_len // bs)]
            mask = None if n == 1 or self.tiled_prefill else _offset_causal(start, n, device)
            if start == 0 and n > 1:
                plan.own.append((offset, n))
            elif n == 1 and batched:
                decode_rows.append((row, offset, len(used)))
            elif used[-1] - used[0] == len(used) - 1 and all(b - a == 1 for a, b in zip(used, used[1:])):
                plan.views.append((offset, n, used[0] * bs, ctx_len, mask))
            else:  # exactly the keys a view would hold, in the same layout: the same numbers wherever the blocks are
                plan.gathers.append((offset, n, ctx_len, row, mask))
            offset += n
        if decode_rows:
            rows = torch.tensor([r for r, _, _ in decode_rows], dtype=torch.long, device=device)
            plan.decode_q = torch.tensor([q for _, q, _ in decode_rows], dtype=torch.long, device=device)
            width = max(w for _, _, w in decode_rows)
            plan.decode_tables = meta.block_tables.index_select(0, rows)[:, :width].contiguous()
            plan.decode_lens = meta.seq_lens.index_select(0, rows)
            if self.decode_kernel is None:  # once per step, not per layer
                plan.decode_mask = self._decode_mask(plan.decode_tables, plan.decode_lens)
        meta.plan = plan

    def _decode_mask(self, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        cols = torch.arange(tables.shape[1] * self.pool.block_size, device=tables.device)
        return (cols[None, :] < lens[:, None])[:, None, None, :]

    def forward(self, layer: int, q, k, v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        pool = self.pool
        pool.write(layer, k, v, meta.slot_mapping, meta.fresh_blocks)
        plan: _Plan | None = meta.plan
        if plan is None:  # decode-only fixed shapes: every row batched, from the tensors alone
            return self._attend_blocks(layer, q, meta.block_tables, meta.seq_lens, None, scale)
        k_pool, v_pool = pool.keys[layer], pool.values[layer]
        out = torch.empty_like(q)
        o = out.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D] views, as SDPA wants them
        qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        for start, n in plan.own:
            s = slice(start, start + n)
            if self.tiled_prefill:
                out[s] = _prefill_tiles(q[s], k[s], v[s], 0, scale)
            else:
                o[:, :, s] = _sdpa(qh[:, :, s], kh[:, :, s], vh[:, :, s], None, True, scale)
        for start, n, slot, ctx_len, mask in plan.views:
            kv = slice(slot, slot + ctx_len)
            self._attend_row(out, q, start, n, k_pool[kv], v_pool[kv], mask, scale)
        for start, n, ctx_len, row, mask in plan.gathers:
            blocks = meta.block_tables[row:row + 1, :-(-ctx_len // pool.block_size)]
            # [1, H, W * bs, D] views of [W * bs, H, D] copies: transposed back, the layout of a pool slice
            keys, values = (pool.gather(t, blocks)[0, :, :ctx_len].transpose(0, 1) for t in (k_pool, v_pool))
            self._attend_row(out, q, start, n, keys, values, mask, scale)
        if plan.decode_q is not None:
            out[plan.decode_q] = self._attend_blocks(layer, q.index_select(0, plan.decode_q), plan.decode_tables,
                                                     plan.decode_lens, plan.decode_mask, scale)
        return out

    def _attend_row(self, out, q, start: int, n: int, k, v, mask, scale) -> None:
        """One row's ``n`` queries ``q[start:start + n]`` (q, out: [T, H_q, D]) over its context ``k`` / ``v``
        [L, H_kv, D] (a pool slice, or a gathered copy in the same layout) into ``out``."""
        s = slice(start, start + n)
        if n == 1:
            out[start] = _decode_one(q[start], k, v, scale)
        elif self.tiled_prefill:
            out[s] = _prefill_tiles(q[s], k, v, k.shape[0] - n, scale)
        else:
            qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q[s], k, v))  # [1, H, len, D], as SDPA wants
            out[s] = _sdpa(qh, kh, vh, mask, False, scale)[0].transpose(0, 1)

    def _attend_blocks(self, layer: int, q, tables, lens, mask, scale) -> torch.Tensor:
        """One query per row, q [B, Hq, D], over the first ``lens[b]`` slots of the blocks ``tables`` [B, W] of
        that row (the rest masked) → [B, Hq, D]: the compiled decode kernel, else a gather of the blocks and one
        SDPA under ``mask`` (``_decode_mask``; None: built here)."""
        pool = self.pool
        if self.decode_kernel is not None:
            blocks = pool.blocks(pool.keys[layer]), pool.blocks(pool.values[layer])
            if self._decode_kernel_ready(blocks, q.shape[1]):
                return self.decode_kernel(q, *blocks, tables, lens, scale)
        k = pool.gather(pool.keys[layer], tables)  # [B, Hkv, W * bs, D]
        v = pool.gather(pool.values[layer], tables)
        if mask is None:
            mask = self._decode_mask(tables, lens)
        return _sdpa(q.unsqueeze(2), k, v, mask, False, scale).squeeze(2)

    def _decode_kernel_ready(self, blocks: tuple[torch.Tensor, torch.Tensor], heads: int) -> bool:
        """Compile the decode kernel at its first use (the runner's warm-up step, at start-up), for a layer's key
        and value ``blocks`` and query head count; where it cannot be built, drop it for good (per-row paths from
        the next step on)."""
        kernel = self.decode_kernel
        if kernel.ready(blocks[0], heads):
            return True
        try:
            self.compile_s += kernel.warm_up(*blocks, heads)
            return True
        except Exception as e:  # noqa: BLE001 - Inductor raises many types where a toolchain is missing
            logger.warning("CPU decode attention kernel unavailable (%s: %s); decode rows use per-row attention, "
                           "which is slower at large batches", type(e).__name__, str(e).splitlines()[0][:200])
            self.decode_kernel = self.graph_decode = None
            return False


def _offset_causal(start: int, n: int, device) -> torch.Tensor:
    """[n, start + n] bool: query i (at position start + i) sees keys 0 .. start + i."""
    return torch.arange(start + n, device=device)[None, :] <= torch.arange(start, start + n, device=device)[:, None]


PREFILL_TILE = 32  # queries per tile of ``_prefill_tiles``: as fast as torch's flash kernel on CPU at 128-512 tokens


def _prefill_tiles(q, k, v, start: int, scale: float) -> torch.Tensor:
    """Causal attention of the queries ``q`` [n, H_q, D] at positions ``start`` .. ``start + n - 1`` over their
    context ``k``, ``v`` [start + n, H_kv, D] → [n, H_q, D], in float32 (bf16 inputs upcast, rounded once at the
    end). The queries are cut into tiles of ``PREFILL_TILE`` at absolute positions (multiples of the tile), padded
    with zero queries, and each tile attends over exactly the keys before its end (zero-padded past the context,
    masked): every product has a shape fixed by the tile's position, so a query's result is the same bits whatever
    chunk it was computed in (tested: ``tests/unit/test_sdpa_prefill.py``)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    group, tile, end = hq // hkv, PREFILL_TILE, start + n
    first = start // tile * tile
    tiles = -(-(end - first) // tile)
    padded = first + tiles * tile
    kf = torch.zeros((hkv, padded, d), dtype=torch.float32, device=q.device)
    vf = torch.zeros_like(kf)
    kf[:, :end] = k[:end].transpose(0, 1)
    vf[:, :end] = v[:end].transpose(0, 1)
    qf = torch.zeros((tiles * tile, hkv, group, d), dtype=torch.float32, device=q.device)
    qf[start - first:end - first] = q.reshape(n, hkv, group, d)
    qf = (qf * scale).reshape(tiles, tile, hkv, group, d).permute(0, 2, 3, 1, 4).contiguous()  # [tiles, H_kv, g, T, D]
    of = torch.empty_like(qf)
    rows = torch.arange(tile, device=q.device)[:, None]
    for i in range(tiles):
        stop = first + (i + 1) * tile
        scores = torch.matmul(qf[i].view(hkv, group * tile, d), kf[:, :stop].transpose(1, 2))
        scores = scores.view(hkv, group, tile, stop)
        scores.masked_fill_(torch.arange(stop, device=q.device)[None, :] > rows + (stop - tile), float("-inf"))
        torch.matmul(torch.softmax(scores, -1).view(hkv, group * tile, stop), vf[:, :stop],
                     out=of[i].view(hkv, group * tile, d))
    out = of.permute(0, 3, 1, 2, 4).reshape(tiles * tile, hq, d)[start - first:end - first]
    return out.to(q.dtype)


def _decode_one(q, k, v, scale) -> torch.Tensor:
    """One query token, q [H_q, D], over its whole context k, v [L, H_kv, D] → [H_q, D]: two float32 einsums
    (query heads grouped per KV head) and a softmax between. Why not SDPA: torch's CPU flash kernel, made for
    query blocks, runs a single query 1.7-7x slower than this (``benchmarks/attention_cpu.py``), a fifth of a
    decode step at a few hundred tokens of context. In float32 throughout (bf16 inputs upcast), so it rounds once,
    at the end, like SDPA's accumulation does."""
    hkv = k.shape[1]
    qg = q.reshape(hkv, -1, q.shape[-1]).float()  # [H_kv, group, D]
    scores = torch.einsum("hgd,lhd->hgl", qg, k.float()) * scale
    out = torch.einsum("hgl,lhd->hgd", torch.softmax(scores, -1), v.float())
    return out.reshape(q.shape).to(q.dtype)


def _sdpa(q, k, v, mask, causal: bool, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
