"""How close single-stream decode runs to the memory-bandwidth limit.

Decoding one token reads every weight once, so a stream cannot beat ``bandwidth / weight_bytes`` tokens/s.
Efficiency = measured decode tokens/s × weight bytes ÷ measured bandwidth. For a TP group the ranks read
their shards in parallel, so the limit is the group's aggregate bandwidth: N processes copying at once.

Bandwidth is measured here, by the benchmark process, with a large ``torch`` copy (bytes read + written
per second): run ``raytp bench`` on the serving node for CPU serving, or pass the device's bandwidth
(``--bandwidth-gbps``) for accelerators, which this process cannot measure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path


def weight_bytes(model_path: str) -> int:
    """Bytes of the checkpoint's weight files (safetensors or PyTorch bins) = bytes read per decoded token."""
    files = [p for p in Path(model_path).glob("*") if p.suffix in (".safetensors", ".bin")]
    if not files:
        raise FileNotFoundError(f"no *.safetensors / *.bin weights in {model_path}")
    return sum(p.stat().st_size for p in files)


def copy_bandwidth(threads: int, size_mb: int = 512, repeats: int = 5) -> float:
    """Best-of-``repeats`` bytes/s of ``dst.copy_(src)`` over ``size_mb`` MB (counts read + write)."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def _worker(threads, size_mb, barrier, out):
    barrier.wait()
    out.put(copy_bandwidth(threads, size_mb))


def aggregate_bandwidth(processes: int, size_mb: int = 512) -> float:
    """Sum of the bandwidth ``processes`` processes reach copying at the same time, the CPUs split among them
    (as the ranks of a TP group on one CPU node)."""
    if processes == 1:
        return copy_bandwidth(os.cpu_count() or 1, size_mb)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // processes)
    procs = [ctx.Process(target=_worker, args=(threads, size_mb, barrier, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    return total


def efficiency(decode_tok_s: float, weights: int, bandwidth: float) -> float:
    """Fraction of the memory-bandwidth limit a decode stream reaches (1.0 = every byte at full bandwidth)."""
    return decode_tok_s * weights / bandwidth


def decode_tok_s(result) -> float:
    """Single-stream decode speed of one request: tokens after the first over the time they took."""
    return (result.output_len - 1) / (result.e2e_s - result.ttft_s)
