"""Attention as one opaque operator, so a compiled model step (``raytp.gang.compiled``) is one graph for every
step: ``torch.ops.raytp.paged_attention(q, k, v, layer, scale)``.

A compiler must not trace into the backend: its per-step plan, block tables and Python branches change with every
batch and would either break the graph or guard it into a recompile per shape. vLLM makes its attention an opaque
custom op that reads the step's metadata from a forward context; so does raytp. The model runner sets the step's
backend and metadata (``step_context``) around the compiled call; the op runs ``backend.forward`` for its layer:
writes the step's keys and values into the paged pool, attends, and returns a new tensor. The pool writes are side
effects the compiler never sees, which is safe because each layer's op consumes the previous layer's output (the
order cannot change) and its output is always used (it is never dropped).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_step: list = [None, None]  # the (backend, metadata) of the step being run: one step at a time per rank process


@contextmanager
def step_context(backend, meta):
    """Within: ``paged_attention`` attends with ``backend`` over the step ``meta``."""
    _step[0], _step[1] = backend, meta
    try:
        yield
    finally:
        _step[0] = _step[1] = None


@torch.library.custom_op("raytp::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k / v [T, Hkv, D] in the model's dtype → [T, Hq, D] contiguous, same dtype (the pool's dtype
    is the probe's: cast in, cast out)."""
    backend, meta = _step
    if backend is None:
        raise RuntimeError("raytp::paged_attention called outside a step (raytp.gang.attention.op.step_context)")
    dtype = backend.pool.dtype(layer)
    out = backend.forward(layer, q.to(dtype), k.to(dtype), v.to(dtype), meta, scale)
    return out.to(q.dtype).contiguous()


@paged_attention.register_fake
def _(q, k, v, layer, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
