"""The attention backends agree: the Triton paged kernel (here through Triton's interpreter, on CPU tensors)
equals the portable sdpa backend over random mixed steps — prefill chunks from position 0 and from the middle,
decode rows, contexts crossing block boundaries, scattered and consecutive block tables, GQA 1 / 4 / 8, head dims
64 / 128, block sizes 16 / 32 — in fp32 to fp32 tolerance, in bf16 / fp16 caches to their rounding. And the
kernel's own paths against float32 SDPA over each row's gathered context: key tiles larger and smaller than a
block, split-KV segments (empty ones too), padded fixed-shape steps, the segment policy."""

import random

import pytest
import torch

from raytp.gang import attention
from raytp.gang.attention import KVPool

pytest.importorskip("triton")

KV_HEADS = 2
# on a GPU machine (tests/device's session script) the kernel compiles for real; elsewhere the interpreter runs it
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_step(rng: random.Random, block_size: int, num_blocks: int):
    """A mixed step's layout: (tokens to compute, first position, block table) per row, tables scattered over the
    pool (one row's consecutive), every row's blocks distinct."""
    kinds = ["prefill", "chunk", "decode", "decode", "chunk", "decode"]
    rng.shuffle(kinds)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    layout = []
    for i, kind in enumerate(kinds):
        if kind == "prefill":
            start, n = 0, rng.randint(2, 40)
        elif kind == "chunk":
            start, n = rng.randint(1, 70), rng.randint(2, 24)
        else:
            start, n = rng.randint(0, 90), 1
        count = -(-(start + n) // block_size) + rng.randint(0, 1)  # sometimes a spare block past the context
        if i == 0:  # consecutive blocks: the sdpa backend's view path
            run = sorted(free)[:count]
            table = tuple(run) if run == list(range(run[0], run[0] + count)) else tuple(free[:count])
        else:
            table = tuple(free[:count])
        free = [b for b in free if b not in table]
        layout.append((n, start, table))
    return layout


def filled_pools(layout, block_size, num_blocks, head_dim, dtype, seed):
    """Two pools with the same context keys/values: the sdpa one as the engine keeps it (the unwritten tail of a
    row's last block zeroed), the triton one with NaN everywhere no context lives (the kernel must never read it)."""
    shapes = {0: (KV_HEADS, head_dim, dtype)}
    gen = torch.Generator().manual_seed(seed)
    pools = [KVPool(shapes, num_blocks, block_size, DEVICE) for _ in range(2)]
    sdpa_pool, triton_pool = pools
    for store in ("keys", "values"):
        data = torch.randn(num_blocks * block_size, KV_HEADS, head_dim, generator=gen).to(DEVICE, dtype)
        getattr(sdpa_pool, store)[0].copy_(data)
        getattr(sdpa_pool, store)[0][:block_size].zero_()
        nan = torch.full_like(data, float("nan"))
        for n, start, table in layout:
            for p in range(start):  # context before this step: the same values in both pools
                slot = table[p // block_size] * block_size + p % block_size
                nan[slot] = data[slot]
            last = table[(start + n - 1) // block_size]
            tail = slice(last * block_size + (start + n - 1) % block_size + 1, (last + 1) * block_size)
            getattr(sdpa_pool, store)[0][tail] = 0
        getattr(triton_pool, store)[0].copy_(nan)
    return sdpa_pool, triton_pool


def run(backend_name, pool, layout, q, k, v, scale):
    backend = attention.create(backend_name, pool)
    meta = attention.build(layout, pool.block_size, DEVICE)
    backend.prepare(meta, layout)
    return backend.forward(0, q, k, v, meta, scale)


@pytest.mark.parametrize("gqa,head_dim,block_size,dtype,seed", [
    (1, 64, 16, torch.float32, 0),
    (4, 128, 32, torch.float32, 1),
    (8, 64, 32, torch.float32, 2),
    (4, 64, 16, torch.float32, 3),
    (8, 128, 16, torch.float32, 4),
    (4, 64, 16, torch.bfloat16, 5),
    (8, 64, 32, torch.float16, 6),
])
def test_triton_kernel_equals_sdpa_on_random_mixed_steps(gqa, head_dim, block_size, dtype, seed):
    rng = random.Random(seed)
    num_blocks = 64
    layout = random_step(rng, block_size, num_blocks)
    sdpa_pool, triton_pool = filled_pools(layout, block_size, num_blocks, head_dim, dtype, seed)
    tokens = sum(n for n, _, _ in layout)
    gen = torch.Generator().manual_seed(100 + seed)
    q, k, v = (torch.randn(tokens, heads, head_dim, generator=gen).to(DEVICE, dtype)
               for heads in (KV_HEADS * gqa, KV_HEADS, KV_HEADS))
    scale = head_dim ** -0.5
    want = run("sdpa", sdpa_pool, layout, q, k, v, scale)
    got = run("triton", triton_pool, layout, q, k, v, scale)
    assert got.isfinite().all(), "the kernel read a slot outside some row's context"
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # the step's keys landed in the same slots of both pools
    meta = attention.build(layout, block_size, DEVICE)
    assert torch.equal(triton_pool.keys[0][meta.slot_mapping], sdpa_pool.keys[0][meta.slot_mapping])


def test_the_kernels_grid_may_be_padded_past_the_step():
    """A graph replays one grid per bucket: extra programs past the last row's query blocks write nothing."""
    from raytp.gang.attention.triton_kernel import paged_attention

    layout = [(5, 0, (1, 2)), (1, 20, (3, 4))]
    _, pool = filled_pools(layout, 16, 8, 64, torch.float32, 0)
    meta = attention.build(layout, 16, DEVICE)
    q = torch.randn(6, 4, 64, device=DEVICE)
    pool.write(0, torch.randn(6, 2, 64, device=DEVICE), torch.randn(6, 2, 64, device=DEVICE), meta.slot_mapping)
    args = (q, pool.keys[0], pool.values[0], meta.query_start_loc, meta.seq_lens, meta.block_tables, 16, 0.125)
    exact = paged_attention(torch.zeros_like(q), *args)
    padded = paged_attention(torch.zeros_like(q), *args, num_tokens_bound=64)
    assert torch.equal(exact, padded)


# A mixed step: a long decode row, a prompt from 0, a decode row of 3 keys (most segments of a split launch
# empty), a chunk with prior context, a decode row ending on a block boundary.
MIXED = [(1, 150), (24, 0), (1, 2), (9, 40), (1, 63)]
DECODE_B1 = [(1, 300)]


def paged_step(rows, block_size: int, gqa: int, head_dim: int, dtype, seed: int):
    """A step's layout over scattered blocks (block 0 unused) and its caches: random keys and values at every
    context slot, NaN everywhere else (a read outside any row's context poisons the output); ``q`` [T, Hq, D]."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(start + n) // block_size) for n, start in rows]
    free = (torch.randperm(sum(need), generator=gen) + 1).tolist()
    layout = []
    for (n, start), count in zip(rows, need):
        layout.append((n, start, tuple(free[:count])))
        free = free[count:]
    slots = sum(need) + 1
    caches = [torch.full((slots * block_size, KV_HEADS, head_dim), float("nan")) for _ in range(2)]
    for n, start, table in layout:
        at = [table[p // block_size] * block_size + p % block_size for p in range(start + n)]
        for cache in caches:
            cache[at] = torch.randn(len(at), KV_HEADS, head_dim, generator=gen)
    q = torch.randn(sum(n for n, _ in rows), KV_HEADS * gqa, head_dim, generator=gen)
    return layout, q.to(DEVICE, dtype), *(c.to(DEVICE, dtype) for c in caches)


def reference(layout, q, keys, values, block_size: int, scale: float) -> torch.Tensor:
    """Per row, float32 SDPA over the row's context gathered into contiguous keys and values, causal."""
    import torch.nn.functional as F

    out, at = [], 0
    for n, start, table in layout:
        slots = [table[p // block_size] * block_size + p % block_size for p in range(start + n)]
        k, v = (c[slots].float().transpose(0, 1) for c in (keys, values))  # [Hkv, L, D]
        visible = torch.arange(start + n, device=q.device)[None, :] <= torch.arange(start, start + n,
                                                                                     device=q.device)[:, None]
        qi = q[at:at + n].float().transpose(0, 1)  # [Hq, n, D]
        out.append(F.scaled_dot_product_attention(qi, k, v, attn_mask=visible, scale=scale,
                                                  enable_gqa=True).transpose(0, 1))
        at += n
    return torch.cat(out)


@pytest.mark.parametrize("rows,gqa,block_size,tile_n,segments,dtype", [
    (MIXED, 1, 16, 64, 1, torch.float32),  # a tile of 4 blocks, single pass
    (MIXED, 4, 8, 64, 1, torch.float32),  # a tile of 8 blocks
    (MIXED, 4, 32, 16, 1, torch.float32),  # a tile of half a block
    (MIXED, 1, 16, 16, 4, torch.float32),
    (MIXED, 4, 16, 64, 3, torch.float32),  # segments of unequal tile counts, the last ones short or empty
    (MIXED, 8, 32, 32, 8, torch.float32),
    (MIXED, 4, 8, 128, 8, torch.float32),  # more segments than any row has tiles: most of them empty
    (MIXED, 4, 16, 64, 4, torch.bfloat16),
    (MIXED, 2, 16, None, None, torch.float32),  # the default tile and segment policy
    (DECODE_B1, 4, 16, 64, 1, torch.float32),  # batch-1 decode, single pass
    (DECODE_B1, 4, 16, 32, 8, torch.float32),  # and split: 10 tiles over 8 segments
    (DECODE_B1, 1, 16, 16, 32, torch.float32),  # 19 tiles over 32 segments: one each, 13 empty
])
def test_kernel_equals_a_contiguous_reference(rows, gqa, block_size, tile_n, segments, dtype):
    """Tiles larger or smaller than a block (each key finds its block through the table), split-KV segments
    (short rows leave segments empty), mixed steps, GQA 1..8: every token equals float32 SDPA over its row's
    gathered context, and no slot outside a context is read (they hold NaN)."""
    from raytp.gang.attention.triton_kernel import paged_attention

    layout, q, keys, values = paged_step(rows, block_size, gqa, 64, dtype, seed=gqa + block_size)
    meta = attention.build(layout, block_size, DEVICE)
    got = paged_attention(torch.zeros_like(q), q, keys, values, meta.query_start_loc, meta.seq_lens,
                          meta.block_tables, block_size, 0.125, num_segments=segments, tile_n=tile_n)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), reference(layout, q, keys, values, block_size, 0.125), atol=tol,
                               rtol=tol)


@pytest.mark.parametrize("segments", [1, 4])
def test_a_padded_step_writes_only_its_rows(segments):
    """A fixed-shape step as ``TokenBuckets`` pads it: empty rows (no token, context 0) and row-less tokens past
    the last row, tables at their full width. Real tokens equal the reference; padding tokens keep the zeros the
    backend starts ``out`` with (``meta.padded``), segmented or not."""
    from raytp.gang.attention.triton_kernel import paged_attention

    layout, q, keys, values = paged_step(MIXED, 16, 4, 64, torch.float32, seed=7)
    meta = attention.build(layout, 16, DEVICE)
    n, pad_tokens, pad_rows = q.shape[0], 12, 3
    q_padded = torch.cat([q, torch.randn(pad_tokens, *q.shape[1:], device=DEVICE)])
    query_start_loc = torch.cat([meta.query_start_loc, torch.full((pad_rows,), n, dtype=torch.int32,
                                                                  device=DEVICE)])
    seq_lens = torch.cat([meta.seq_lens, torch.zeros(pad_rows, dtype=torch.int32, device=DEVICE)])
    tables = torch.zeros((len(MIXED) + pad_rows, 32), dtype=torch.int32, device=DEVICE)
    tables[:len(MIXED), :meta.block_tables.shape[1]] = meta.block_tables
    got = paged_attention(torch.zeros_like(q_padded), q_padded, keys, values, query_start_loc, seq_lens, tables,
                          16, 0.125, num_segments=segments)
    torch.testing.assert_close(got[:n], reference(layout, q, keys, values, 16, 0.125), atol=2e-5, rtol=2e-5)
    assert torch.equal(got[n:], torch.zeros_like(got[n:]))


def test_segments_depend_on_the_launch_shape_only():
    """Many segments for few decode rows, one once the step fills the device, never more than the tables' tiles."""
    from raytp.gang.attention.triton_kernel import MAX_SEGMENTS, segments_for

    h200 = dict(num_sms=132)
    assert segments_for(1, 8, **h200) == MAX_SEGMENTS  # batch-1 decode of an 8B-shaped layer
    assert segments_for(64, 8, **h200) == 1  # 64 decode rows: 512 programs already
    counts = [segments_for(t, 8, **h200) for t in (1, 2, 4, 8, 16, 32, 64, 512)]
    assert counts == sorted(counts, reverse=True) and all(c & (c - 1) == 0 for c in counts)
    assert segments_for(1, 8, max_kv_len=128, tile_n=64, **h200) == 2  # a table of 128 keys: two tiles
    assert segments_for(1, 2, num_sms=1) == 2  # the interpreter (1 "SM"): few programs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metadata_built_on_the_device_equals_the_host_build(seed):
    """A rank builds each step's metadata from its persistent device tables (rows in any slot order, tables
    holding spare blocks past the context): the same tensors as the plain host build."""
    rng = random.Random(seed)
    layout = random_step(rng, 16, 64)
    slots = rng.sample(range(10), len(layout))
    tables = torch.zeros((10, 12), dtype=torch.int32, device=DEVICE)
    for (_, _, table), slot in zip(layout, slots):
        tables[slot, :len(table)] = torch.tensor(table, dtype=torch.int32)
    want = attention.build(layout, 16, DEVICE)
    got = attention.build_on_device(layout, 16, tables, slots)
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping", "positions"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert set(got.fresh_blocks.tolist()) - {0} == set(want.fresh_blocks.tolist())
    assert (got.num_tokens, got.num_rows) == (want.num_tokens, want.num_rows)
