"""The attention backend seam: every layer of a step calls ``backend.forward(layer, q, k, v, meta, scale)``.

One backend per rank, chosen once at start-up (``create``): ``sdpa`` (portable torch, every device) or
``triton`` (one fused paged kernel per layer, CUDA and XPU). A new kernel is a new file and one line in
``BACKENDS``.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from raytp.gang.attention.kv_pool import KVPool
from raytp.gang.attention.metadata import AttentionMetadata, Layout

# name -> "module:class"; imported on use, so the portable backend never imports Triton
BACKENDS = {
    "sdpa": "raytp.gang.attention.sdpa:SdpaBackend",
    "triton": "raytp.gang.attention.triton_backend:TritonBackend",
}


class AttentionBackend:
    """Writes a layer's new keys/values into the pool and attends every query token over its row's context.

    Contract of ``forward``: ``q`` [T, Hq, D], ``k`` / ``v`` [T, Hkv, D] (T = ``meta.num_tokens``, in the pool's
    dtype) → [T, Hq, D]; token t of row r attends to positions 0 .. its own of row r (causal). ``graph_safe``:
    for decode-only metadata whose tensors keep their storage, ``forward`` does no host sync and no
    data-dependent allocation, so a step can be captured as a graph and replayed. ``ragged``: also for any mix
    of rows (prompt chunks and decodes) padded with empty rows and row-less tokens (``meta.padded``), so whole
    steps can be (``raytp.gang.static_step``)."""

    name = ""
    graph_safe = False
    ragged = False

    def __init__(self, pool: KVPool):
        self.pool = pool

    def prepare(self, meta: AttentionMetadata, layout: Layout) -> None:
        """Once per step, before the forward: anything the backend derives from the host layout (``meta.plan``)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        raise NotImplementedError


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def create(name: str, pool: KVPool, **options) -> AttentionBackend:
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(pool, **options)
