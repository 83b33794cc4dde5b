"""raytp's CPU decode attention kernel (``raytp::cpu_paged_decode``, ``csrc/paged_decode.cpp``) against a float32
reference over each row's context read slot by slot: every GQA group size and head dim it takes, contexts from one
key to several 16-key groups with ragged ends, padded tables, the KV write it does first; a row's bits the same
alone, in any batch, however far its table is padded, at any thread count; and where the kernel cannot run (not
bf16), Inductor's loops attend."""

import pytest
import torch

from raytp.gang.attention import cpu_decode

BLOCK = 16
needs_kernel = pytest.mark.skipif(not cpu_decode.native_available(), reason="no AVX-512 or no compiler")


def pool(kv_heads, dim, blocks=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(blocks * BLOCK, kv_heads, dim, generator=gen).bfloat16() for _ in range(2))
    return keys, values


def reference(q, keys, values, table, length, scale):
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)]
    k, v = keys[slots].float(), values[slots].float()  # [L, Hkv, D]
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    weights = torch.softmax(torch.einsum("hd,lhd->hl", q.float() * scale, k), -1)
    return torch.einsum("hl,lhd->hd", weights, v)


def run(q, keys, values, tables, lens, scale, k=None, v=None, slots=None):
    width = max(len(t) for t in tables)
    table = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return torch.ops.raytp.cpu_paged_decode(q, k, v, keys, values, slots, table,
                                            torch.tensor(lens, dtype=torch.int32), scale, BLOCK)


@needs_kernel
@pytest.mark.parametrize("kv_heads,group,dim", [(2, 1, 64), (2, 4, 64), (1, 8, 128), (4, 2, 32), (8, 2, 64)])
def test_equals_a_float32_reference(kv_heads, group, dim):
    keys, values = pool(kv_heads, dim, seed=kv_heads * group + dim)
    tables = [tuple(range(1, 9)), (20, 13, 31, 2), (35,), (40, 41), (7, 9, 11)]
    lens = [128, 50, 1, 17, 33]  # whole groups of 16, ragged ends, a lone key
    q = torch.randn(len(lens), kv_heads * group, dim).bfloat16()
    got = run(q, keys, values, tables, lens, dim ** -0.5)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    for i, (table, n) in enumerate(zip(tables, lens)):
        torch.testing.assert_close(got[i].float(), reference(q[i], keys, values, table, n, dim ** -0.5),
                                   atol=1e-2, rtol=1e-2)


@needs_kernel
def test_writes_each_rows_key_and_value_before_attending_over_them():
    keys, values = pool(2, 64)
    k, v = torch.randn(2, 2, 64).bfloat16(), torch.randn(2, 2, 64).bfloat16()
    q = torch.randn(2, 8, 64).bfloat16()
    tables, lens = [(3, 4), (10,)], [20, 5]
    slots = torch.tensor([4 * BLOCK + 3, 10 * BLOCK + 4])  # each row's last position
    got = run(q, keys, values, tables, lens, 0.125, k, v, slots)
    assert torch.equal(keys[slots], k) and torch.equal(values[slots], v)
    for i in range(2):
        torch.testing.assert_close(got[i].float(), reference(q[i], keys, values, tables[i], lens[i], 0.125),
                                   atol=1e-2, rtol=1e-2)


@needs_kernel
def test_a_row_has_the_same_bits_alone_padded_in_any_batch_and_at_any_thread_count():
    keys, values = pool(2, 64, seed=3)
    tables = [(1, 2, 30), (5,), tuple(range(6, 18)), (19, 25, 21)]
    lens = [40, 9, 180, 33]
    for table, n in zip(tables, lens):  # past a row's length its last block may hold anything, NaN included
        tail = slice(table[-1] * BLOCK + n % BLOCK, (table[-1] + 1) * BLOCK)
        keys[tail], values[tail] = float("nan"), float("nan")
    q = torch.randn(4, 8, 64).bfloat16()
    batch = run(q, keys, values, tables, lens, 0.125)
    assert not batch.isnan().any()
    for i in range(4):
        alone = run(q[i:i + 1], keys, values, [tables[i]], [lens[i]], 0.125)
        padded = run(q[i:i + 1], keys, values, [tables[i] + (0,) * 5], [lens[i]], 0.125)
        assert torch.equal(alone[0], batch[i]) and torch.equal(padded[0], batch[i]), i
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            assert torch.equal(run(q, keys, values, tables, lens, 0.125), batch), t
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_refuses_what_it_cannot_read():
    keys, values = pool(2, 64)
    with pytest.raises(ValueError, match="bf16"):
        run(torch.randn(1, 4, 64), keys, values, [(1,)], [3], 0.125)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        run(torch.randn(1, 3, 64).bfloat16(), keys, values, [(1,)], [3], 0.125)
    narrow_keys, narrow_values = pool(2, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        run(torch.randn(1, 4, 24).bfloat16(), narrow_keys, narrow_values, [(1,)], [3], 0.125)


def test_only_bf16_cpu_pools_take_the_kernel():
    assert not cpu_decode.native_supported(torch.zeros(4, 2, 64))
    assert not cpu_decode.native_supported(torch.zeros(4, 2, 24, dtype=torch.bfloat16))
    assert cpu_decode.native_supported(torch.zeros(4, 2, 64, dtype=torch.bfloat16)) == cpu_decode.native_available()
