"""The sdpa backend's prompt rows on CPU (``tiled_prefill``: queries in tiles at fixed positions): a prompt's
attention output is the same bits however the prompt is cut into chunks and wherever its blocks lie (its first
chunk attends to its own keys, later chunks to a view of consecutive blocks or to a gathered copy of scattered
ones), in float32 and bf16, and it equals float32 SDPA over the whole prompt."""

import pytest
import torch
import torch.nn.functional as F

from raytp.gang import attention
from raytp.gang.attention import KVPool

BLOCK = 16
HEAD_DIM = 64
KV_HEADS, GROUP = 2, 4


def prompt_in_chunks(q, k, v, chunks: list[int], table: tuple[int, ...], dtype) -> torch.Tensor:
    """Attention output of every position of one prompt computed chunk by chunk (lengths ``chunks``) into a pool
    where the prompt's blocks are ``table``."""
    pool = KVPool({0: (KV_HEADS, HEAD_DIM, dtype)}, 40, BLOCK, "cpu")
    backend = attention.create("sdpa", pool, tiled_prefill=True)
    outs, start = [], 0
    for n in chunks:
        layout = [(n, start, table)]
        meta = attention.build(layout, BLOCK, "cpu")
        backend.prepare(meta, layout)
        s = slice(start, start + n)
        outs.append(backend.forward(0, q[s], k[s], v[s], meta, HEAD_DIM ** -0.5))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompts_attention_does_not_depend_on_its_chunks_or_blocks(dtype):
    gen = torch.Generator().manual_seed(0)
    length = 101
    q = torch.randn(length, KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    consecutive, scattered = tuple(range(3, 10)), (12, 4, 30, 7, 21, 9, 15)
    whole = prompt_in_chunks(q, k, v, [length], consecutive, dtype)
    reference = F.scaled_dot_product_attention(*(t.float().transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                               scale=HEAD_DIM ** -0.5, enable_gqa=True).transpose(0, 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(whole.float(), reference, atol=tol, rtol=tol)
    # a cached 64-token prefix and a 37-token tail (view, then gather); one-, two- and odd-sized chunks
    for chunks in ([64, 37], [33, 33, 35], [50, 1, 2, 48], [96, 5]):
        for table in (consecutive, scattered):
            got = prompt_in_chunks(q, k, v, chunks, table, dtype)
            differ = (got != whole).flatten(1).any(1).nonzero().flatten().tolist()
            # a one-query chunk is a decode row (its own path; the engine never leaves a one-token prompt tail)
            ones = [sum(chunks[:i]) for i, n in enumerate(chunks) if n == 1]
            assert [p for p in differ if p not in ones] == [], (chunks, table)
