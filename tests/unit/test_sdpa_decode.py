"""The sdpa backend's decode rows (one query over a paged context: per row ``_decode_one``, or every row in one call
of the compiled CPU kernel ``attention.cpu_decode``; not torch's SDPA) equal float32 SDPA over the row's context
for every GQA group size, and give the same numbers, bit for bit, whether the row's blocks are consecutive in the
pool (a view) or scattered (a gathered copy): where the block manager put a row's blocks — e.g. whether its prefix
came from the cache — must not change its answer. With the kernel, neither do the other rows of the step."""

import pytest
import torch
import torch.nn.functional as F

from raytp.gang import attention
from raytp.gang.attention import KVPool

BLOCK = 16
HEAD_DIM = 64


def decode_step(pool: KVPool, tables: list[tuple[int, ...]], starts: list[int], q, k, v, kernel: bool = False):
    layout = [(1, start, table) for start, table in zip(starts, tables)]
    # batch_invariant: the kernel for a lone decode row too (without it, one row goes per row)
    backend = attention.create("sdpa", pool, decode_kernel=kernel, batch_invariant=kernel)
    with torch.inference_mode():  # as a rank's steps run (the kernel's graphs are compiled for inference tensors)
        meta = attention.build(layout, BLOCK, "cpu")
        backend.prepare(meta, layout)
        return backend.forward(0, q, k, v, meta, HEAD_DIM ** -0.5)


def reference(pool: KVPool, table, start: int, q_row, k_row, v_row):
    """float32 SDPA of one query over the row's context read slot by slot (its new key/value last)."""
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start)]
    keys = torch.cat([pool.keys[0][slots], k_row[None].to(pool.dtype(0))]).float()
    values = torch.cat([pool.values[0][slots], v_row[None].to(pool.dtype(0))]).float()
    out = F.scaled_dot_product_attention(q_row.float()[:, None], keys.transpose(0, 1), values.transpose(0, 1),
                                         scale=HEAD_DIM ** -0.5, enable_gqa=True)
    return out[:, 0]


@pytest.mark.parametrize("kernel", [False, True], ids=["per_row", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,group", [(2, 1), (2, 4), (1, 8), (4, 2)])
def test_decode_rows_equal_float32_sdpa(dtype, kv_heads, group, kernel):
    gen = torch.Generator().manual_seed(kv_heads * 10 + group)
    pool = KVPool({0: (kv_heads, HEAD_DIM, dtype)}, 40, BLOCK, "cpu")
    for t in (pool.keys[0], pool.values[0]):
        t[BLOCK:].copy_(torch.randn(t[BLOCK:].shape, generator=gen).to(dtype))
    tables = [tuple(range(1, 9)), (20, 13, 31, 2), (35,)]  # consecutive, scattered, one block
    starts = [100, 50, 3]
    q = torch.randn(3, kv_heads * group, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(3, kv_heads, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    got = decode_step(pool, tables, starts, q, k, v, kernel)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (table, start) in enumerate(zip(tables, starts)):
        torch.testing.assert_close(got[i].float(), reference(pool, table, start, q[i], k[i], v[i]),
                                   atol=tol, rtol=tol)


@pytest.mark.parametrize("kernel", [False, True], ids=["per_row", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_row_gives_the_same_numbers_wherever_its_blocks_are(dtype, kernel):
    gen = torch.Generator().manual_seed(0)
    kv_heads, start = 2, 70
    q = torch.randn(1, kv_heads * 4, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(1, kv_heads, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    context = [torch.randn(start, kv_heads, HEAD_DIM, generator=gen).to(dtype) for _ in range(2)]
    outs = []
    for table in ((3, 4, 5, 6, 7), (9, 2, 17, 5, 11)):  # the view path, then the gather path
        pool = KVPool({0: (kv_heads, HEAD_DIM, dtype)}, 20, BLOCK, "cpu")
        for store in (pool.keys[0], pool.values[0]):  # a block's unwritten tail may hold anything, NaN included
            store[BLOCK:].fill_(float("nan"))
        for store, data in zip((pool.keys[0], pool.values[0]), context):
            for p in range(start):
                store[table[p // BLOCK] * BLOCK + p % BLOCK] = data[p]
        outs.append(decode_step(pool, [table], [start], q, k, v, kernel))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_gives_a_row_the_same_numbers_in_any_batch_and_never_recompiles(dtype):
    """A row alone (one row, its own table width, 1 or more blocks) and the same row among others whose tables
    are wider: the same bits. Every step after the warm-up runs without compiling."""
    from raytp.gang.attention.cpu_decode import PagedDecode

    gen = torch.Generator().manual_seed(1)
    kv_heads, group = 2, 4
    pool = KVPool({0: (kv_heads, HEAD_DIM, dtype)}, 60, BLOCK, "cpu")
    for t in (pool.keys[0], pool.values[0]):
        t[BLOCK:].copy_(torch.randn(t[BLOCK:].shape, generator=gen).to(dtype))
    tables = [(30, 31), (5,), tuple(range(40, 52)), (7, 2, 19), (50, 51, 52, 53, 54, 55, 56)]
    starts = [20, 9, 180, 33, 100]
    n = len(tables)
    q = torch.randn(n, kv_heads * group, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(n, kv_heads, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    decode_step(pool, tables[:1], starts[:1], q[:1], k[:1], v[:1], kernel=True)  # the warm-up
    before = PagedDecode.shared().recompiles
    batch = decode_step(pool, tables, starts, q, k, v, kernel=True)
    for i in range(n):  # a step's own key is written first, so each row alone sees what it saw in the batch
        alone = decode_step(pool, tables[i:i + 1], starts[i:i + 1], q[i:i + 1], k[i:i + 1], v[i:i + 1], True)
        assert torch.equal(alone[0], batch[i]), f"row {i}"
    for size in (3, 2, 4):  # other row counts and widths
        decode_step(pool, tables[:size], starts[:size], q[:size], k[:size], v[:size], kernel=True)
    assert PagedDecode.shared().recompiles == before


def test_without_a_toolchain_decode_rows_fall_back_to_per_row_attention(monkeypatch, caplog):
    """Where Inductor cannot build the kernel (no C++ compiler), the step still computes, per row, with a warning."""
    from raytp.gang.attention.cpu_decode import PagedDecode

    def no_compiler(self, *args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(PagedDecode, "warm_up", no_compiler)
    gen = torch.Generator().manual_seed(2)
    pool = KVPool({0: (2, HEAD_DIM, torch.float32)}, 20, BLOCK, "cpu")
    for t in (pool.keys[0], pool.values[0]):
        t[BLOCK:].copy_(torch.randn(t[BLOCK:].shape, generator=gen))
    q = torch.randn(2, 6, HEAD_DIM, generator=gen)
    k, v = (torch.randn(2, 2, HEAD_DIM, generator=gen) for _ in range(2))
    tables, starts = [(3, 4), (9,)], [20, 5]
    kernel_rows = decode_step(pool, tables, starts, q, k, v, kernel=True)
    assert "decode attention kernel unavailable" in caplog.text
    per_row = decode_step(pool, tables, starts, q, k, v, kernel=False)
    torch.testing.assert_close(kernel_rows, per_row, atol=1e-5, rtol=1e-5)
