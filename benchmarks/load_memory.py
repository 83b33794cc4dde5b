"""Host memory while a TP gang loads: per rank and for the whole node, sampled every 50 ms.

Starts a raytp gang (`RayExecutor`, the serving path's loader) and samples every rank process's RSS and PSS
(proportional set size: pages shared between ranks, like a memory-mapped checkpoint, are split among them, so
the ranks' PSS add up to what the node really spends) from before the load until a first forward has run.
Run it in the default environment (transformers 5: safetensors are memory-mapped, each rank copies only its
shard) and in .venv-ipex (transformers 4.47, the version ipex-llm and upstream's AutoTP examples use: every
rank reads the whole checkpoint into its own memory, then shards it) to compare with upstream's approach.
`--recipe upstream` measures upstream's recipe instead (DeepSpeed's AutoTP inference example): N plain
processes that each call `from_pretrained(path, torch_dtype=...)`, then `deepspeed.init_inference(tp_size=N,
replace_with_kernel_inject=False)`, then run one forward, with the same sampler.
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

UPSTREAM = r"""
# raytp-upstream-recipe
import os, sys, torch, deepspeed
from transformers import AutoModelForCausalLM
rank, world, path, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], getattr(torch, sys.argv[4])
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world))
torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()
model = deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=dtype,
                                 replace_with_kernel_inject=False).module
with torch.inference_mode():
    model(torch.arange(10, 74).unsqueeze(0))
print("done", rank)
"""


def upstream(path: str, tp: int, dtype: str) -> tuple[float, list[int]]:
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", UPSTREAM, str(r), str(tp), path, dtype], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(tp)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    return time.monotonic() - started, [p.pid for p in procs]


def sample_ranks(stop: threading.Event, out: list) -> None:
    """Append (time, {pid: (rss, pss)}) for every rank process (a raytp Worker actor or an upstream-recipe
    process) until ``stop``."""
    import psutil

    while not stop.is_set():
        snap = {}
        for p in psutil.process_iter(["cmdline"]):
            if any("ray::Worker" in part or "raytp-upstream-recipe" in part for part in (p.info["cmdline"] or [])):
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
    ap.add_argument("--recipe", choices=("raytp", "upstream"), default="raytp")
    ap.add_argument("--name", default=None, help="results name (default: load_memory_<recipe>_transformers<major>)")
    args = ap.parse_args()

    import ray
    import transformers

    from raytp import tiny_model
    from raytp.bench.direct import DirectBatch
    from raytp.bench.roofline import weight_bytes
    from raytp.config import resolve
    from raytp.gang.executor import RayExecutor
    from raytp.messages import SamplingParams

    path = tiny_model.ensure(args.model) if args.model in tiny_model.PRESETS else args.model
    weights = weight_bytes(path)
    samples: list = []
    stop = threading.Event()

    async def run():
        ex = RayExecutor(resolve({"model": args.model, "tensor_parallel_size": args.tp, "device": "cpu",
                                  "dtype": args.dtype,
                                  "num_cpus_per_worker": max(1, (os.cpu_count() or 2) // args.tp)}))
        started = time.monotonic()
        await ex.start()
        loaded = time.monotonic() - started
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        rows = DirectBatch(ex, [tuple(range(10, 74))], params)
        await rows.step()  # prefill
        await rows.step()
        pids = await ex.pids()
        ex.shutdown()
        return loaded, pids

    if args.recipe == "raytp":
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    sampler = threading.Thread(target=sample_ranks, args=(stop, samples), daemon=True)
    sampler.start()
    if args.recipe == "raytp":
        load_s, pids = asyncio.run(run())
    else:
        load_s, pids = upstream(path, args.tp, args.dtype)
    stop.set()
    sampler.join()
    if args.recipe == "raytp":
        ray.shutdown()

    mb = 2**20
    per_rank = [{"rank": r, "peak_rss_mb": max((s.get(pid, (0, 0))[0] for _, s in samples), default=0) / mb,
                 "peak_pss_mb": max((s.get(pid, (0, 0))[1] for _, s in samples), default=0) / mb}
                for r, pid in enumerate(pids)]
    node_pss = max(sum(s.get(pid, (0, 0))[1] for pid in pids) for _, s in samples) / mb
    node_rss = max(sum(s.get(pid, (0, 0))[0] for pid in pids) for _, s in samples) / mb
    full = weights / mb
    result = {"recipe": args.recipe, "model": args.model, "dtype": args.dtype, "tp": args.tp,
              "transformers": transformers.__version__,
              "checkpoint_mb": full, "load_s": load_s, "per_rank": per_rank, "node_peak_pss_mb": node_pss,
              "node_peak_rss_sum_mb": node_rss, "node_peak_pss_over_n_x_checkpoint": node_pss / (args.tp * full),
              "samples": len(samples)}
    lines = [f"# Load memory ({args.recipe}): {args.model} {args.dtype}, TP={args.tp}, transformers "
             f"{transformers.__version__}", "",
             f"checkpoint {full:.0f} MB; loaded in {load_s:.1f} s; {len(samples)} samples", "",
             "| rank | peak RSS (MB) | peak PSS (MB) |", "| --- | --- | --- |"]
    lines += [f"| {r['rank']} | {r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} |" for r in per_rank]
    lines += ["", f"node peak (sum of ranks' PSS at one instant): **{node_pss:.0f} MB** = "
              f"{node_pss / (args.tp * full):.2f} × (TP × checkpoint {args.tp * full:.0f} MB); "
              f"sum of RSS (counts shared pages twice): {node_rss:.0f} MB"]
    major = transformers.__version__.split(".")[0]
    _results.write(args.name or f"load_memory_{args.recipe}_transformers{major}", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
