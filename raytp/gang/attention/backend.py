"""The attention backend seam: every layer of a step calls ``backend.forward(layer, q, k, v, meta, scale)``.

One backend per rank, chosen once at start-up (``create``): ``sdpa`` (portable torch, every device) or
``triton`` (one fused paged kernel per layer, CUDA and XPU). A new kernel is a new file and one line in
``BACKENDS``.
"""

from __future__ import annotations

import importlib

import torch

from raytp.gang.attention.kv_pool import KVPool
from raytp.gang.attention.metadata import AttentionMetadata, Layout
from raytp.gang.attention.shapes import StepShapes

# name -> "module:class"; imported on use, so the portable backend never imports Triton
BACKENDS = {
    "sdpa": "raytp.gang.attention.sdpa:SdpaBackend",
    "triton": "raytp.gang.attention.triton_backend:TritonBackend",
}


class AttentionBackend:
    """Writes a layer's new keys/values into the pool and attends every query token over its row's context.

    Contract of ``forward``: ``q`` [T, Hq, D], ``k`` / ``v`` [T, Hkv, D] (T = ``meta.num_tokens``, in the pool's
    dtype) → [T, Hq, D]; token t of row r attends to positions 0 .. its own of row r (causal). A backend whose
    ``forward`` does no host sync and no data-dependent allocation on the metadata its ``shapes`` policy builds
    can have those steps captured as graphs and replayed (``raytp.gang.graph_runner``)."""

    name = ""
    compile_s = 0.0  # seconds spent building the backend's kernels (reported in /health as part of compile_s)
    # A function a compiled decode-only step traces inline (``raytp.gang.compiled``), or None (compiled steps call
    # ``forward`` through the opaque ``torch.ops.raytp.paged_attention``): ``(q [B, Hq, D], k / v [B, Hkv, D], keys,
    # values (the layer's pool tensors), slots [B], tables [B, W], lens [B], scale) -> [B, Hq, D]``, one query per
    # row, writing the row's key and value into its slot first. Pure tensor code on its arguments: no plan, no
    # host sync, no Python branch on values.
    graph_decode = None

    def __init__(self, pool: KVPool):
        self.pool = pool

    def prepare(self, meta: AttentionMetadata, layout: Layout) -> None:
        """Once per step, before the forward: anything the backend derives from the host layout (``meta.plan``)."""

    def shapes(self, *, max_tokens: int, max_rows: int, max_blocks: int) -> StepShapes | None:
        """The fixed shapes this backend's steps can be padded to for graph capture (``attention.shapes``), for
        steps of up to ``max_tokens`` tokens in ``max_rows`` rows of up to ``max_blocks`` blocks; None: eager only."""
        return None

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        raise NotImplementedError


def create(name: str, pool: KVPool, **options) -> AttentionBackend:
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(pool, **options)
