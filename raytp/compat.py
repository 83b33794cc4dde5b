"""The few places where transformers 4.4x (ipex-llm's pin) and transformers 5 differ."""

from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS_5 = Version(transformers.__version__) >= Version("5.0.0")


def dtype_kwarg(dtype) -> dict:
    """transformers 5 takes ``dtype=``; 4.x takes ``torch_dtype=``."""
    return {"dtype": dtype} if TRANSFORMERS_5 else {"torch_dtype": dtype}


def cache_arg_name(model) -> str:
    """Newer transformers 5 releases call the KV-cache argument ``cache``; older ones ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def logits_to_keep_kwarg(model) -> dict:
    """Ask the forward for the last position's logits only (``logits_to_keep`` in transformers >= 4.50,
    ``num_logits_to_keep`` before); {} if this model's forward has neither (e.g. remote code)."""
    import inspect

    names = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in names:
            return {name: 1}
    return {}


def empty_cache():
    """The cache object to pass on a prefill. transformers 4.x returns a legacy tuple cache when given None,
    which cannot be filtered or merged in place, so give it a DynamicCache; 5.x makes its own."""
    if TRANSFORMERS_5:
        return None
    from transformers import DynamicCache

    return DynamicCache()


def output_cache(output):
    """The KV cache a forward returned, under whichever name this transformers uses."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_kv(cache) -> list[tuple]:
    """Per-layer (keys, values) tensors [batch, kv_heads, seq, head_dim] of an HF dynamic cache."""
    if hasattr(cache, "layers"):  # transformers 5: one DynamicLayer per decoder layer
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers 4.x


def set_cache_kv(cache, kv: list[tuple]) -> None:
    """Replace every layer's tensors (after filtering or merging rows)."""
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, kv):
            layer.keys, layer.values = k, v
        return
    cache.key_cache = [k for k, _ in kv]
    cache.value_cache = [v for _, v in kv]
    if hasattr(cache, "_seen_tokens"):
        cache._seen_tokens = kv[0][0].shape[-2]
