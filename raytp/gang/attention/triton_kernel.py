"""A paged-attention kernel in Triton: every row of a step — prefill chunks and decode rows together — in one
launch per layer, reading keys and values through the block tables.

Written for raytp (vLLM's unified Triton attention and FlashAttention-2's tiling were the design references;
no code was taken). Why a kernel of our own: no maintained library ships one that reads *our* block tables on
both NVIDIA and Intel GPUs (flash-attn is CUDA-only and wants its own cache layout; vLLM's kernels come with
vLLM), and Triton compiles for both (torch's XPU wheels ship Triton's Intel backend).

Layout (``raytp.gang.attention.kv_pool``): a layer's cache is ``[num_blocks * block_size, kv_heads, head_dim]``;
the key of position ``p`` of a row lives in slot ``table[p // block_size] * block_size + p % block_size``.
The step's own keys and values are written there first (one slot-mapping scatter per layer), so the kernel
reads every key, old and new, from the cache. Every pointer offset is computed in int64 (a slot times its
stride overflows int32 once a cache holds a few million slots).

Tiling: one program per (query block, kv head, segment). A query block is ``BLOCK_Q`` consecutive query tokens
of one row times every query head that shares the kv head (GQA heads packed into the rows of one tile, so a
decode row of an 8:1 GQA model still fills the tile). The program walks its keys in tiles of ``TILE_N`` (each
key finds its block through the table, so a tile may span several blocks or part of one: ``TILE_N`` is chosen
for the GPU, not for ``block_size``), online softmax in fp32, causal within the row's chunk. The query blocks of
all rows are numbered consecutively, row ``r``'s starting at ``query_start_loc[r] // BLOCK_Q + r``; a program
finds its row by binary search, so the grid depends only on the (padded) token and row counts.

Segments (split-KV): a step of few query blocks — batch-1 decode above all — has too few programs to fill a GPU
(8 for one decode row of an 8-kv-head model), each walking the whole context alone. With ``S`` segments the
grid gets a third dimension: segment ``s`` of a query block takes the ``s``-th of ``S`` equal runs of whole tiles
of the keys that block sees (computed in the kernel from ``seq_lens``, so short rows leave trailing segments
empty) and writes its unnormalised partial (acc, running max m, sum l) to a float32 scratch; a second launch
merges the segments of each (token, head) by log-sum-exp. An empty segment writes m = -inf, l = 0, acc = 0,
which the merge weighs by zero. ``segments_for`` picks S from the launch shape only (tokens, kv heads, table
width; and the device's SM count), so one token bucket is one grid and one graph; S = 1 is the single-pass path
(no scratch, no merge).

Launch policy (``launch_config``, fixed, not autotuned: graphs and determinism want one configuration per
shape): 2 stages; 16-bit K/V in 64-key tiles, 4 warps up to head dim 128 and 8 above; float32 in 32-key tiles, 8
warps. No configuration spills registers on sm_90 as a launch specialises it
(``tests/unit/test_attention_kernel_compiles.py`` compiles each for an H100 and reads its registers and stack).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_SEGMENTS = 32
# programs in flight per SM that a split step aims for: several tiles' loads outstanding per SM is what it takes
# to approach HBM bandwidth (a 132-SM H100/H200: 528 programs)
PROGRAMS_PER_SM = 4
MERGE_OPTIONS = {"num_warps": 4, "num_stages": 1}  # the merge reads a few partials per (token, head): small


@triton.jit
def _query_tile(query_start_loc_ptr, num_rows, q_block, kv_head,
                QUERIES_PER_KV: tl.constexpr, GQA_PAD: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Query block ``q_block``'s row and its tile's rows: ``BLOCK_Q`` tokens x ``GQA_PAD`` heads, token-major."""
    # the last row whose first query block is <= q_block
    lo = 0
    hi = num_rows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid
        else:
            hi = mid
    row = lo
    q_start = tl.load(query_start_loc_ptr + row)
    q_len = tl.load(query_start_loc_ptr + row + 1) - q_start
    local = q_block - (q_start // BLOCK_Q + row)
    offs_m = tl.arange(0, BLOCK_Q * GQA_PAD)
    tok = local * BLOCK_Q + offs_m // GQA_PAD
    head_in_group = offs_m % GQA_PAD
    q_head = kv_head * QUERIES_PER_KV + head_in_group
    m_valid = (tok < q_len) & (head_in_group < QUERIES_PER_KV)
    return row, q_start, q_len, local, tok, q_head, m_valid


@triton.jit
def _paged_attention_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    scale, num_rows, num_tokens,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_cache_slot, stride_cache_head, stride_table_row,
    NUM_Q_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr, GQA_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    # 1. The tile's row and queries.
    row, q_start, q_len, local, tok, q_head, m_valid = _query_tile(
        query_start_loc_ptr, num_rows, q_block, kv_head, QUERIES_PER_KV, GQA_PAD, BLOCK_Q)
    if local * BLOCK_Q >= q_len:
        return  # past the row's last query block (each row has one spare slot in the numbering)
    seq_len = tl.load(seq_lens_ptr + row)
    first_pos = seq_len - q_len  # position of the row's first query token
    q_pos = first_pos + tok
    token = (q_start + tok).to(tl.int64)
    offs_d = tl.arange(0, HEAD_PAD)
    d_valid = offs_d < HEAD_DIM
    md_valid = m_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_q_tok + q_head[:, None] * stride_q_head + offs_d[None, :],
                mask=md_valid, other=0.0)

    # 2. This segment's keys: its share of whole tiles of those the block sees (up to its last query's position).
    kv_len = tl.minimum(seq_len, first_pos + (local + 1) * BLOCK_Q)
    segment_keys = tl.cdiv(tl.cdiv(kv_len, TILE_N), NUM_SEGMENTS) * TILE_N
    seg_start = segment * segment_keys
    seg_end = tl.minimum(kv_len, seg_start + segment_keys)

    # 3. Online softmax over them.
    m_i = tl.full([BLOCK_Q * GQA_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GQA_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GQA_PAD, HEAD_PAD], tl.float32)
    table = block_tables_ptr + row.to(tl.int64) * stride_table_row
    offs_n = tl.arange(0, TILE_N)
    for start in range(seg_start, seg_end, TILE_N):
        k_pos = start + offs_n
        n_valid = k_pos < seg_end
        block = tl.load(table + k_pos // BLOCK_SIZE, mask=n_valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + k_pos % BLOCK_SIZE
        kv_off = slot[:, None] * stride_cache_slot + kv_head * stride_cache_head + offs_d[None, :]
        kv_mask = n_valid[:, None] & d_valid[None, :]  # masked loads: unwritten slots never reach the sums
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        visible = n_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # 4. One segment: normalise and store. Several: store the partial for the merge (an empty one: -inf, 0, 0).
    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_o_tok + q_head[:, None] * stride_o_head + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=md_valid)
    else:
        part = (segment.to(tl.int64) * num_tokens + token) * NUM_Q_HEADS + q_head
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=md_valid)
        tl.store(part_m_ptr + part, m_i, mask=m_valid)
        tl.store(part_l_ptr + part, l_i, mask=m_valid)


@triton.jit
def _merge_segments_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, query_start_loc_ptr,
    num_rows, num_tokens, stride_o_tok, stride_o_head,
    NUM_Q_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr, GQA_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
):
    """The attention kernel's grid without segments: each program merges its tile's partials by log-sum-exp."""
    row, q_start, q_len, local, tok, q_head, m_valid = _query_tile(
        query_start_loc_ptr, num_rows, tl.program_id(0), tl.program_id(1), QUERIES_PER_KV, GQA_PAD, BLOCK_Q)
    if local * BLOCK_Q >= q_len:
        return  # tokens of no query block (padding) were never written: their output stays as the caller left it
    token = (q_start + tok).to(tl.int64)
    offs_d = tl.arange(0, HEAD_PAD)
    md_valid = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]

    # 1. The largest segment max, which every segment's weight is taken relative to.
    m_max = tl.full([BLOCK_Q * GQA_PAD], float("-inf"), tl.float32)
    for s in range(NUM_SEGMENTS):
        part = (s * num_tokens + token) * NUM_Q_HEADS + q_head
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + part, mask=m_valid, other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # (a real query sees itself: never all empty)

    # 2. Weighted sums: an empty segment (m = -inf) weighs exp(-inf) = 0 and adds nothing.
    l_sum = tl.zeros([BLOCK_Q * GQA_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GQA_PAD, HEAD_PAD], tl.float32)
    for s in range(NUM_SEGMENTS):
        part = (s * num_tokens + token) * NUM_Q_HEADS + q_head
        weight = tl.exp(tl.load(part_m_ptr + part, mask=m_valid, other=float("-inf")) - m_safe)
        l_sum += weight * tl.load(part_l_ptr + part, mask=m_valid, other=0.0)
        acc += weight[:, None] * tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                                         mask=md_valid, other=0.0)
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    tl.store(out_ptr + token[:, None] * stride_o_tok + q_head[:, None] * stride_o_head + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=md_valid)


def _interpreted() -> bool:
    """Under Triton's interpreter (CPU tensors, tests). Its ``tl.dot`` of bf16 operands is wrong in triton 3.9
    (numpy has no bf16): there the kernel upcasts bf16 operands to fp32 before each dot; on a GPU bf16 dots are
    native, fp32 ones exact (ieee, not tf32)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def launch_config(queries_per_kv: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(GQA_PAD, BLOCK_Q, TILE_N, num_warps, num_stages). Query heads per kv head padded to a power of two, and
    enough query tokens per tile that a tile has at least 16 rows (Triton's smallest dot). 16-bit K/V: 64 keys per
    tile, 4 warps up to head dim 128, 8 above (the larger accumulator); float32: 32 keys, 8 warps; 2 stages. Each fits
    in registers on sm_90 under Triton 3.6 and 3.9 (64 to 128 registers), where float32 at 4 warps spilled 272-536
    bytes a thread and a 16-bit 32-key tile at head dim 256 and 8 warps 8 bytes under Triton 3.9. A fixed policy
    rather than autotuning: one configuration per shape, the same at capture and at every replay."""
    gqa_pad = triton.next_power_of_2(queries_per_kv)
    block_q = max(1, 16 // gqa_pad)
    head_pad = max(16, triton.next_power_of_2(head_dim))
    if dtype.itemsize == 2:
        return gqa_pad, block_q, 64, 4 if head_pad <= 128 else 8, 2
    return gqa_pad, block_q, 32, 8, 2


def kernel_constants(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, *, block_size: int,
                     tile_n: int, num_segments: int) -> tuple[dict, dict]:
    """The constexprs one ``paged_attention`` call compiles its kernels with: (the attention kernel's, the merge
    kernel's). Float32 dots are exact (ieee); under the interpreter bf16 operands are upcast too (``_interpreted``)."""
    queries_per_kv = num_q_heads // num_kv_heads
    gqa_pad, block_q, *_ = launch_config(queries_per_kv, head_dim, dtype)
    merge = dict(NUM_Q_HEADS=num_q_heads, QUERIES_PER_KV=queries_per_kv, GQA_PAD=gqa_pad, HEAD_DIM=head_dim,
                 HEAD_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_Q=block_q, NUM_SEGMENTS=num_segments)
    fp32_dot = dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreted())
    return {**merge, "BLOCK_SIZE": block_size, "TILE_N": tile_n, "FP32_DOT": fp32_dot}, merge


def segments_for(num_tokens: int, num_kv_heads: int, *, num_sms: int, max_kv_len: int | None = None,
                 tile_n: int = 64) -> int:
    """How many segments each query block's keys are split into: a pure function of the launch shape (and the
    device), so one token bucket is one grid. ``num_tokens * num_kv_heads`` is the programs a decode step has
    without segments (one query block per row): the largest power of two, up to ``MAX_SEGMENTS``, that keeps the
    grid within ``PROGRAMS_PER_SM * num_sms`` — 1, the single pass, once the step alone fills the device (64
    decode rows of 8 kv heads on a 132-SM GPU). ``max_kv_len`` (the block tables' width times the block size, a
    shape too) caps them at one tile per segment."""
    segments = 1
    while segments < MAX_SEGMENTS and num_tokens * num_kv_heads * segments * 2 <= PROGRAMS_PER_SM * num_sms:
        segments *= 2
    if max_kv_len is not None:
        segments = min(segments, max(1, -(-max_kv_len // tile_n)))
    return segments


@functools.lru_cache
def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors (CUDA) or subslices (XPU); 1 for CPU tensors (the interpreter runs
    programs one after another: more of them only cost time)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "xpu":
        return getattr(torch.xpu.get_device_properties(device), "gpu_subslice_count", 64)
    return 1


def paged_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    block_size: int, scale: float, num_tokens_bound: int | None = None, *,
                    num_segments: int | None = None, tile_n: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """Attention of every query token over its row's context, causal within the row.

    ``q`` [T, Hq, D] and ``out`` [T, Hq, D] (any strides with a unit last one); ``k_cache`` / ``v_cache``
    [slots, Hkv, D] already holding this step's keys and values; ``query_start_loc`` [R + 1] (int32, row r's
    tokens are ``q[query_start_loc[r]:query_start_loc[r + 1]]``), ``seq_lens`` [R] (each row's context length
    after this step: its last query token's position + 1), ``block_tables`` [R, W] (int32; entries past a row's
    context are never read). Tokens of no row (a padded step's tail) are not written. ``num_tokens_bound``: an
    upper bound on T fixing the grid (graph capture); T by default. ``num_segments``: split-KV segments,
    ``segments_for`` of the launch shape by default; ``tile_n``: keys per tile (a power of two >= 16),
    ``launch_config``'s by default, as is ``num_warps`` (overrides for benchmarks). Every launch parameter depends
    on shapes only. Returns ``out``."""
    num_rows = seq_lens.shape[0]
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    queries_per_kv = num_q_heads // num_kv_heads
    _, block_q, default_tile, default_warps, num_stages = launch_config(queries_per_kv, head_dim, k_cache.dtype)
    tile_n = tile_n or default_tile
    num_warps = num_warps or default_warps
    bound = num_tokens if num_tokens_bound is None else num_tokens_bound
    if num_segments is None:
        num_segments = segments_for(bound, num_kv_heads, num_sms=sm_count(q.device),
                                    max_kv_len=block_tables.shape[1] * block_size, tile_n=tile_n)
    if num_segments > 1:
        part_acc = torch.empty((num_segments, num_tokens, num_q_heads, head_dim), dtype=torch.float32,
                               device=q.device)
        part_m, part_l = torch.empty((2, num_segments, num_tokens, num_q_heads), dtype=torch.float32,
                                     device=q.device)
    else:
        part_acc = part_m = part_l = out  # never touched: the single pass writes ``out`` directly
    attention_constants, merge_constants = kernel_constants(num_q_heads, num_kv_heads, head_dim, q.dtype,
                                                            block_size=block_size, tile_n=tile_n,
                                                            num_segments=num_segments)
    num_q_blocks = bound // block_q + num_rows
    _paged_attention_kernel[(num_q_blocks, num_kv_heads, num_segments)](
        out, part_acc, part_m, part_l, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
        scale, num_rows, num_tokens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        num_warps=num_warps, num_stages=num_stages, **attention_constants,
    )
    if num_segments > 1:
        _merge_segments_kernel[(num_q_blocks, num_kv_heads)](
            out, part_acc, part_m, part_l, query_start_loc, num_rows, num_tokens, out.stride(0), out.stride(1),
            **MERGE_OPTIONS, **merge_constants,
        )
    return out
