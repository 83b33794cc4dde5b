"""What a rank reports about itself: load time, host memory, KV cache size. No Ray."""

from __future__ import annotations

import logging
import time

from raytp.messages import LoadReport

logger = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def memory_stats(rank: int) -> dict:
    """Host memory of this process now: RSS, PSS (shared pages split among sharers) and peak RSS, in MB."""
    import psutil

    full = psutil.Process().memory_full_info()
    return {"rank": rank, "rss_mb": full.rss / 2**20, "pss_mb": getattr(full, "pss", 0) / 2**20,
            "peak_rss_mb": peak_rss_mb()}


def weight_bytes(model) -> int:
    """Bytes of a model's parameters and buffers as stored: a quantized tensor subclass (torchao) counts its
    packed inner tensors, not its logical shape; an opaque oneDNN weight (``PackedLinear``) counts its logical
    elements (its blocked layout pads little, and its storage cannot be read)."""

    def nbytes(t) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Tensor", "Parameter"):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:  # tied weights once
            seen.add(id(t))
            total += nbytes(t)
    return total


def load_report(rank: int, start: float, model, runner) -> LoadReport:
    """The ``LoadReport`` of a rank that started loading at ``start`` (``time.perf_counter``) and built ``runner``."""
    import psutil

    report = LoadReport(
        rank=rank, load_s=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(),
        rss_mb=psutil.Process().memory_info().rss / 2**20,
        num_params=sum(p.numel() for p in model.parameters()), num_kv_blocks=runner.num_blocks,
        kv_block_bytes=runner.block_bytes, kv_block_size=runner.block_size, weight_bytes=weight_bytes(model),
        decode_mode=runner.graphs.mode if runner.graphs is not None else
        ("compiled" if runner.compiled is not None else "eager"),
        decode_warm_up_s=runner.graphs.warm_up_s if runner.graphs is not None else 0.0,
        compile_s=(runner.compiled.warm_up_s if runner.compiled is not None else 0.0)
        + getattr(runner.backend, "compile_s", 0.0),
        graphs_compiled=runner.compiled.warm_up_compiles if runner.compiled is not None else 0,
        graphs_loaded=runner.compiled.loaded if runner.compiled is not None else 0,
        attention_backend=runner.attention_backend,
    )
    logger.info("rank %d: model loaded in %.1fs, peak RSS %.0f MB, KV cache %d blocks of %d tokens (%.0f MB)", rank,
                report.load_s, report.peak_rss_mb, runner.num_blocks, runner.block_size,
                runner.num_blocks * runner.block_bytes / 2**20)
    return report
