"""One rank's paged KV cache: per layer, keys and values in blocks of ``block_size`` slots."""

from __future__ import annotations

import torch


class KVPool:
    """Per layer, keys and values of shape [num_blocks * block_size, kv_heads, head_dim] (token-major slots).
    Block 0 is the null block (zeros): padding of block tables points there."""

    def __init__(self, shapes: dict[int, tuple[int, int, torch.dtype]], num_blocks: int, block_size: int, device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        n = max(shapes) + 1
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        for layer, (heads, dim, dtype) in shapes.items():
            for store in (self.keys, self.values):
                # empty, not zeros: on CPU the pages are committed only when a block is first written
                t = torch.empty((num_blocks * block_size, heads, dim), dtype=dtype, device=device)
                store[layer] = t
        self.zero_null_block()

    def zero_null_block(self) -> None:
        for t in (*self.keys, *self.values):
            if t is not None:
                t[:self.block_size].zero_()

    @staticmethod
    def block_bytes(shapes: dict[int, tuple[int, int, torch.dtype]], block_size: int) -> int:
        return sum(2 * block_size * h * d * dtype.itemsize for h, d, dtype in shapes.values())

    def dtype(self, layer: int) -> torch.dtype:
        return self.keys[layer].dtype

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
              fresh: torch.Tensor | None = None) -> None:
        """The step's ``key``/``value`` [T, kv_heads, D] into their ``slots`` [T]: one scatter each. ``fresh``:
        blocks whose first slot is written now, zeroed first, for backends that read whole blocks (so the
        unwritten tail of a sequence's last block is never stale memory that could hold NaN)."""
        k, v = self.keys[layer], self.values[layer]
        if fresh is not None:  # index_fill_, not blocks[fresh] = 0: no host scalar copied (CUDA graph capture)
            self.blocks(k).index_fill_(0, fresh, 0)
            self.blocks(v).index_fill_(0, fresh, 0)
        k.index_copy_(0, slots, key.to(k.dtype))
        v.index_copy_(0, slots, value.to(v.dtype))

    def blocks(self, t: torch.Tensor) -> torch.Tensor:
        """[num_blocks, block_size, kv_heads, head_dim] view of a layer's keys or values."""
        return t.view(self.num_blocks, self.block_size, *t.shape[1:])

    def gather(self, t: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Whole blocks ``tables`` [B, W] of a layer's keys or values → [B, kv_heads, W * block_size, head_dim]
        (copies contiguous blocks, far cheaper than gathering token by token)."""
        # index_select, not t[tables]: advanced indexing is ~7x slower on CPU for the same copy
        g = self.blocks(t).index_select(0, tables.flatten())  # [B * W, bs, H, D]
        return g.view(tables.shape[0], -1, *g.shape[2:]).transpose(1, 2)
