"""A paged-attention kernel in Triton: every row of a step — prefill chunks and decode rows together — in one
launch per layer, reading keys and values through the block tables.

Written for raytp (vLLM's unified Triton attention and FlashAttention-2's tiling were the design references;
no code was taken). Why a kernel of our own: no maintained library ships one that reads *our* block tables on
both NVIDIA and Intel GPUs (flash-attn is CUDA-only and wants its own cache layout; vLLM's kernels come with
vLLM), and Triton compiles for both (torch's XPU wheels ship Triton's Intel backend).

Layout (``raytp.gang.attention.kv_pool``): a layer's cache is ``[num_blocks * block_size, kv_heads, head_dim]``;
the key of position ``p`` of a row lives in slot ``table[p // block_size] * block_size + p % block_size``.
The step's own keys and values are written there first (one slot-mapping scatter per layer), so the kernel
reads every key, old and new, from the cache.

Tiling: one program per (query block, kv head). A query block is ``BLOCK_Q`` consecutive query tokens of one
row times every query head that shares the kv head (GQA heads packed into the rows of one tile, so a decode
row of an 8:1 GQA model still fills the tile). The program walks the row's context in tiles of ``TILE_N`` keys
(any block size: each key finds its block through the table), online softmax in fp32, causal within the row's
chunk. The query blocks of all rows are numbered consecutively, row ``r``'s starting at
``query_start_loc[r] // BLOCK_Q + r``; a program finds its row by binary search, so the grid depends only on the
(padded) token and row counts — one shape per bucket, which a graph can capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    scale, num_rows,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_cache_slot, stride_cache_head, stride_table_row,
    QUERIES_PER_KV: tl.constexpr, GQA_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)

    # 1. The row this query block belongs to: the last row whose first query block is <= q_block.
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
    if local * BLOCK_Q >= q_len:
        return  # past the row's last query block (each row has one spare slot in the numbering)
    seq_len = tl.load(seq_lens_ptr + row)
    first_pos = seq_len - q_len  # position of the row's first query token

    # 2. The tile's queries: BLOCK_Q tokens x GQA_PAD heads, flattened (token-major).
    offs_m = tl.arange(0, BLOCK_Q * GQA_PAD)
    tok = local * BLOCK_Q + offs_m // GQA_PAD
    head_in_group = offs_m % GQA_PAD
    q_head = kv_head * QUERIES_PER_KV + head_in_group
    m_valid = (tok < q_len) & (head_in_group < QUERIES_PER_KV)
    q_pos = first_pos + tok
    offs_d = tl.arange(0, HEAD_PAD)
    d_valid = offs_d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_q_tok + q_head[:, None] * stride_q_head + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    # 3. Online softmax over the keys this tile can see: up to its last query's position.
    m_i = tl.full([BLOCK_Q * GQA_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GQA_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GQA_PAD, HEAD_PAD], tl.float32)
    kv_len = tl.minimum(seq_len, first_pos + (local + 1) * BLOCK_Q)
    table = block_tables_ptr + row * stride_table_row
    offs_n = tl.arange(0, TILE_N)
    for start in range(0, kv_len, TILE_N):
        k_pos = start + offs_n
        n_valid = k_pos < kv_len
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

    # 4. Normalise and store each (token, head) of the tile.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_o_tok + q_head[:, None] * stride_o_head + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def _interpreted() -> bool:
    """Under Triton's interpreter (CPU tensors, tests). Its ``tl.dot`` of bf16 operands is wrong in triton 3.9
    (numpy has no bf16): there the kernel upcasts bf16 operands to fp32 before each dot; on a GPU bf16 dots are
    native, fp32 ones exact (ieee, not tf32)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def tile_shape(queries_per_kv: int, block_size: int) -> tuple[int, int, int]:
    """(GQA_PAD, BLOCK_Q, TILE_N): query heads per kv head padded to a power of two; enough query tokens per
    tile that a tile has at least 16 rows (Triton's smallest dot); keys per tile, at least 16 and a block."""
    gqa_pad = triton.next_power_of_2(queries_per_kv)
    block_q = max(1, 16 // gqa_pad)
    tile_n = max(16, min(64, triton.next_power_of_2(block_size)))
    return gqa_pad, block_q, tile_n


def paged_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    block_size: int, scale: float, num_tokens_bound: int | None = None) -> torch.Tensor:
    """Attention of every query token over its row's context, causal within the row.

    ``q`` [T, Hq, D] and ``out`` [T, Hq, D] (any strides with a unit last one); ``k_cache`` / ``v_cache``
    [slots, Hkv, D] already holding this step's keys and values; ``query_start_loc`` [R + 1] (int32, row r's
    tokens are ``q[query_start_loc[r]:query_start_loc[r + 1]]``), ``seq_lens`` [R] (each row's context length
    after this step: its last query token's position + 1), ``block_tables`` [R, W] (int32; entries past a row's
    context are never read). ``num_tokens_bound``: an upper bound on T fixing the grid (graph capture); T by
    default. Returns ``out``."""
    num_rows = seq_lens.shape[0]
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    queries_per_kv = num_q_heads // num_kv_heads
    gqa_pad, block_q, tile_n = tile_shape(queries_per_kv, block_size)
    bound = q.shape[0] if num_tokens_bound is None else num_tokens_bound
    grid = (bound // block_q + num_rows, num_kv_heads)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
        scale, num_rows,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv, GQA_PAD=gqa_pad, HEAD_DIM=head_dim,
        HEAD_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, BLOCK_Q=block_q,
        TILE_N=tile_n, FP32_DOT=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and _interpreted()),
    )
    return out
