"""The fused backend: one Triton launch per layer for every row of a step (``triton_kernel``), on CUDA and XPU.

The kernel masks every key past a row's context, so blocks need no zeroing (``fresh_blocks`` is ignored) and
the block tables' padding is never read. Its grid and launch parameters depend only on shapes — the token and
row counts and the tables' width; its split-KV segments (``triton_kernel.segments_for``) on the step's token
count, which on fixed shapes is the bucket's padded count (``meta.num_tokens``) — and it reads everything else
from the metadata's tensors: graph-safe, for whole mixed steps too (``TokenBuckets``). On CPU tensors it runs
only under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests it.
"""

from __future__ import annotations

import torch

from raytp.gang.attention.backend import AttentionBackend
from raytp.gang.attention.metadata import AttentionMetadata
from raytp.gang.attention.shapes import TokenBuckets


class TritonBackend(AttentionBackend):
    name = "triton"

    def shapes(self, *, max_tokens: int, max_rows: int, max_blocks: int) -> TokenBuckets:
        """Whole steps, mixed ones too: the grid depends only on the token and row counts."""
        return TokenBuckets(self.pool.block_size, self.pool.device, max_tokens=max_tokens, max_rows=max_rows,
                            max_blocks=max_blocks)

    def forward(self, layer: int, q, k, v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from raytp.gang.attention.triton_kernel import paged_attention

        self.pool.write(layer, k, v, meta.slot_mapping)
        # a padded step's row-less tokens get no output from the kernel: zeros keep them finite through the layers
        out = torch.zeros_like(q) if meta.padded else torch.empty_like(q)
        return paged_attention(out, q, self.pool.keys[layer], self.pool.values[layer],
                               meta.query_start_loc, meta.seq_lens, meta.block_tables, self.pool.block_size,
                               scale)
