"""Attention backends plugged into unmodified Hugging Face model classes.

* transformers 5 routes every attention call through its attention interface: a function registered with
  ``AttentionInterface.register`` and selected by name receives each layer's query / key / value and every
  extra keyword given to ``model(...)``. raytp registers ``raytp_paged``; ``model(..., raytp_backend=...,
  raytp_meta=...)`` reaches it in every layer, which calls ``backend.forward``. transformers' own ``paged|sdpa``
  pieces were not used: its ``PagedAttentionCache`` allocates blocks itself, and here the driver's scheduler
  must own every block table so all ranks stay in lockstep (``raytp.engine.kv_cache``).
* transformers 4.47 (IPEX-LLM's pin) has no attention interface: every attention class calls
  ``past_key_value.update(k, v, layer_idx)`` and then computes SDPA itself over what it returns, with the 4-D
  mask given to the model. The adapter (``legacy_cache_cls``) writes the step's keys through the same pool and
  metadata and returns every row's context packed row after row, with a block-diagonal causal mask
  (``legacy_mask``) so the model's own SDPA attends within each row. The query never reaches the cache there, so
  no backend's kernel can run on 4.47: it is the compatibility path for IPEX-LLM low-bit.

Both are model-agnostic for decoder-only models with plain causal attention (Llama, Qwen2, Mistral without
sliding window, ...) and work on DeepSpeed AutoTP shards (each rank's layers see only their heads) and IPEX-LLM
low-bit shards (only linears change; loaded with ``optimize_llm=False`` so the attention stays HF's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raytp.gang.attention import op  # noqa: F401 - registers torch.ops.raytp.paged_attention
from raytp.gang.attention.backend import AttentionBackend
from raytp.gang.attention.kv_pool import KVPool
from raytp.gang.attention.metadata import AttentionMetadata

ATTN_NAME = "raytp_paged"


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-interface signature: query [1, Hq, T, D], key/value [1, Hkv, T, D] → ([1, T, Hq, D],
    None). Without a ``raytp_backend`` (the shape probe at load), plain causal SDPA over the given keys."""
    layer = module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    graph = kwargs.get("raytp_graph")
    if graph is not None:  # a compiled decode-only step: the backend's attention traced inline (``graph_decode``)
        attend, (slots, tables, lens, keys, values) = graph
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [B, H, D]
        return attend(q, k, v, keys[layer], values[layer], slots, tables, lens, scale).unsqueeze(0), None
    if kwargs.get("raytp_op"):  # a compiled step: one opaque op per layer (``attention.op``)
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
        return torch.ops.raytp.paged_attention(q, k, v, layer, scale).unsqueeze(0), None
    backend: AttentionBackend | None = kwargs.get("raytp_backend")
    probe: dict | None = kwargs.get("raytp_probe")
    if probe is not None:
        probe[layer] = (key.shape[1], key.shape[3], key.dtype)
    if backend is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None
    dtype = backend.pool.dtype(layer)  # the pool has the dtype the probe saw: never copy it, cast the step's
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # [T, H, D] views when no cast
    out = backend.forward(layer, q, k, v, kwargs["raytp_meta"], scale)
    return out.to(query.dtype).unsqueeze(0), None


def register() -> bool:
    """Register ``raytp_paged`` with transformers' attention interface; False if this transformers has none."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    return True


# ---- transformers 4.47: keys packed row after row, block-diagonal causal mask --------------------------------
class LegacyStep:
    """One step of the 4.x adapter: the metadata's rows' contexts, packed, computed once and read by every layer."""

    def __init__(self, pool: KVPool | None, meta: AttentionMetadata):
        self.pool, self.meta = pool, meta
        lens = meta.seq_lens.long()
        pos = torch.arange(int(lens.max()), device=lens.device)
        valid = pos[None, :] < lens[:, None]  # [R, L]: each row's context positions
        rows = torch.arange(meta.num_rows, device=lens.device)
        self._k_row = rows[:, None].expand_as(valid)[valid]
        self._k_pos = pos[None].expand_as(valid)[valid]
        self._q_row = torch.repeat_interleave(rows, meta.query_start_loc.diff().long())
        if pool is not None:  # (None: the shape probe, which writes nothing)
            bs = pool.block_size  # every row's context slots, row after row
            self.packed_slots = meta.block_tables.long()[self._k_row, self._k_pos // bs] * bs + self._k_pos % bs

    def gather(self, layer: int, key, value):
        """Write the step's keys/values [1, Hkv, T, D]; return every row's whole context packed [1, Hkv, K, D]."""
        self.pool.write(layer, key[0].transpose(0, 1), value[0].transpose(0, 1), self.meta.slot_mapping,
                        self.meta.fresh_blocks)
        k = self.pool.keys[layer].index_select(0, self.packed_slots).transpose(0, 1).unsqueeze(0)
        v = self.pool.values[layer].index_select(0, self.packed_slots).transpose(0, 1).unsqueeze(0)
        return k.to(key.dtype), v.to(value.dtype)

    def mask(self, dtype) -> torch.Tensor:
        """[1, 1, T, K] additive mask over the packed keys: token i of a row sees that row's positions <= its own."""
        q_pos = self.meta.positions[0]
        allowed = (self._q_row[:, None] == self._k_row[None, :]) & (self._k_pos[None, :] <= q_pos[:, None])
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def legacy_cache_cls():
    """transformers 4.x: a ``Cache`` whose ``update`` writes the paged blocks and returns the step's packed keys."""
    from transformers import Cache

    class LegacyPagedCache(Cache):
        def __init__(self, step: LegacyStep, probe: dict | None = None):
            super().__init__()
            self.step = step
            self.probe = probe

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            if self.probe is not None:
                self.probe[layer_idx] = (key_states.shape[1], key_states.shape[3], key_states.dtype)
            if self.step.pool is None:
                return key_states, value_states
            return self.step.gather(layer_idx, key_states, value_states)

        def get_seq_length(self, layer_idx=0):
            return 0

        def get_max_length(self):
            return None

        def get_max_cache_shape(self):
            return None

    return LegacyPagedCache
