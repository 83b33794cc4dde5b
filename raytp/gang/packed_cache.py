"""Let Inductor's FX graph cache keep graphs whose frozen constants are oneDNN's packed weights.

A compiled CPU model step holds the prepacked linears' weights (``raytp.gang.linears.PackedLinear``: oneDNN
tensors) as frozen constants. Inductor's cache refuses any graph with a oneDNN tensor in it ("mkldnn tensors
unpickleable"), so every start compiled again: ~190 s for the 0.5B on 2 cores, most of it Inductor generating
code (measured: ``Scheduler.codegen`` 83 s of 188 s, the C++ compiler, whose cache did hit, 0.1 s).

For a frozen constant that is not inlined, the cache needs no values: its key takes the tensor's metadata only and
a cache hit takes the values from the live graph module (``CompiledFxGraphConstantsWithGm``); only the cacheability
check and the metadata extraction (oneDNN tensors have no strides) stand in the way. ``install`` lets a frozen
oneDNN tensor through both, keyed by its shape, dtype and device; every other tensor goes the way it went. The
generated code does not depend on the packed layout (it hands the tensor to ``mkldnn._linear_pointwise``), and the
layout depends only on the shape, dtype and this CPU, which the cache's key already covers (its system key holds
the CPU's ISA).

Written here, not upstream's way, because torch 2.13 has no hook for it; the two functions it wraps are checked for
at install, and a torch without them keeps its own behaviour (compiling at every start).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_installed = False


def _frozen_packed(t) -> bool:
    from torch._inductor.freezing_utils import is_frozen_param

    return t.is_mkldnn and is_frozen_param(t)


def install() -> bool:
    """Patch Inductor's cache key as the module docstring says (idempotent); returns whether it is in place."""
    global _installed
    if _installed:
        return True
    try:
        from torch._inductor import codecache

        validator, pickler = codecache.CacheabilityValidator, codecache.FxGraphCachePickler
        check, reduce, ident = validator.check_tensor, pickler._reduce_tensor, codecache._ident
    except (ImportError, AttributeError) as e:  # another torch: leave its cache as it is
        logger.info("Inductor's cache keeps compiling graphs with packed weights at every start (%s)", e)
        return False

    def check_tensor(t):
        if not _frozen_packed(t):
            check(t)

    def reduce_tensor(self, t):
        if _frozen_packed(t):
            return ident, (("mkldnn", tuple(t.shape), str(t.dtype), str(t.device)),)
        return reduce(self, t)

    validator.check_tensor = staticmethod(check_tensor)
    pickler._reduce_tensor = reduce_tensor
    _installed = True
    return True
