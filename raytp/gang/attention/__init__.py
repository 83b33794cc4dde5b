"""Attention over a rank's paged KV cache: the pool (``kv_pool``), one step's metadata as device tensors
(``metadata``), the backend seam (``backend``: ``sdpa``, ``triton``) and its hook into transformers (``hf``)."""

from raytp.gang.attention.backend import BACKENDS, AttentionBackend, create
from raytp.gang.attention.kv_pool import KVPool
from raytp.gang.attention.metadata import AttentionMetadata, Layout, build, build_on_device

__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "KVPool", "Layout", "build", "build_on_device",
           "create"]
