"""Host memory while a TP gang loads: per rank and for the whole node, sampled every 50 ms.

Starts a raytp gang (`RayExecutor`, the serving path's loader) and samples every rank process's RSS and PSS
(proportional set size: pages shared between ranks, like a memory-mapped checkpoint, are split among them, so
the ranks' PSS add up to what the node really spends) from before the load until a first forward has run.
Run it in the default environment (transformers 5: safetensors are memory-mapped, each rank copies only its
shard) and in .venv-ipex (transformers 4.47, the version ipex-llm and upstream's AutoTP examples use: every
rank reads the whole checkpoint into its own memory, then shards it) to compare with upstream's approach.
Results: benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script


def sample_ranks(stop: threading.Event, out: list) -> None:
    """Append (time, {pid: (rss, pss)}) for every Ray worker process of class Worker until ``stop``."""
    import psutil

    while not stop.is_set():
        snap = {}
        for p in psutil.process_iter(["cmdline"]):
            if any("ray::Worker" in part for part in (p.info["cmdline"] or [])):
                try:
                    info = p.memory_full_info()
                    snap[p.pid] = (info.rss, info.pss)
                except psutil.Error:
                    pass
        out.append((time.monotonic(), snap))
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="raytp-llama-0.5b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--name", default=None, help="results name (default: load_memory_<transformers version>)")
    args = ap.parse_args()

    import ray
    import transformers

    from raytp import tiny_model
    from raytp.config import resolve
    from raytp.engine.types import SamplingParams, SeqInput
    from raytp.executor import RayExecutor

    path = tiny_model.ensure(args.model) if args.model in tiny_model.PRESETS else args.model
    weights = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    samples: list = []
    stop = threading.Event()

    async def run():
        ex = RayExecutor(resolve({"model": args.model, "tensor_parallel_size": args.tp, "device": "cpu",
                                  "dtype": args.dtype, "num_cpus_per_worker": max(1, (os.cpu_count() or 2) // args.tp)}))
        started = time.monotonic()
        await ex.start()
        loaded = time.monotonic() - started
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        await ex.execute("step", [], [SeqInput("m", tuple(range(10, 74)), params)], False)
        await ex.execute("step", [], [], True)
        pids = await ex.pids()
        ex.shutdown()
        return loaded, pids

    sampler = threading.Thread(target=sample_ranks, args=(stop, samples), daemon=True)
    sampler.start()
    load_s, pids = asyncio.run(run())
    stop.set()
    sampler.join()
    ray.shutdown()

    mb = 2**20
    per_rank = [{"rank": r, "peak_rss_mb": max((s.get(pid, (0, 0))[0] for _, s in samples), default=0) / mb,
                 "peak_pss_mb": max((s.get(pid, (0, 0))[1] for _, s in samples), default=0) / mb}
                for r, pid in enumerate(pids)]
    node_pss = max(sum(s.get(pid, (0, 0))[1] for pid in pids) for _, s in samples) / mb
    node_rss = max(sum(s.get(pid, (0, 0))[0] for pid in pids) for _, s in samples) / mb
    full = weights / mb
    result = {"model": args.model, "dtype": args.dtype, "tp": args.tp, "transformers": transformers.__version__,
              "checkpoint_mb": full, "load_s": load_s, "per_rank": per_rank, "node_peak_pss_mb": node_pss,
              "node_peak_rss_sum_mb": node_rss, "node_peak_pss_over_n_x_checkpoint": node_pss / (args.tp * full),
              "samples": len(samples)}
    lines = [f"# Load memory: {args.model} {args.dtype}, TP={args.tp}, transformers {transformers.__version__}", "",
             f"checkpoint {full:.0f} MB; loaded in {load_s:.1f} s; {len(samples)} samples", "",
             "| rank | peak RSS (MB) | peak PSS (MB) |", "| --- | --- | --- |"]
    lines += [f"| {r['rank']} | {r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} |" for r in per_rank]
    lines += ["", f"node peak (sum of ranks' PSS at one instant): **{node_pss:.0f} MB** = "
              f"{node_pss / (args.tp * full):.2f} × (TP × checkpoint {args.tp * full:.0f} MB); "
              f"sum of RSS (counts shared pages twice): {node_rss:.0f} MB"]
    _results.write(args.name or f"load_memory_transformers{transformers.__version__.split('.')[0]}", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
