"""TP scaling on this machine: memory per rank and greedy decode speed, TP=1 vs TP=2 vs plain transformers.

For each model: (a) plain transformers in one process (all cores); (b) a raytp TP=1 gang (one rank, all
cores); (c) a raytp TP=2 gang (two ranks, cores split). Reports peak RSS (per rank) and greedy decode
tokens/s at batch 1 and batch 8, plus time from serve.run to a healthy app for TP=2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

HF_SCRIPT = r"""
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM
from raytp.compat import dtype_kwarg
path, dtype, n_new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(path, low_cpu_mem_usage=True, **dtype_kwarg(getattr(torch, dtype))).eval()
load_s = time.perf_counter() - t
out = {"load_s": load_s}
for batch in (1, 8):
    ids = torch.randint(10, 400, (batch, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        m.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    out[f"tok_s_b{batch}"] = batch * n_new / (time.perf_counter() - t)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import psutil
out["pss_mb"] = psutil.Process().memory_full_info().pss / 2**20
print("RESULT " + json.dumps(out))
"""


def hf_baseline(path: str, dtype: str, n_new: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", HF_SCRIPT, path, dtype, str(n_new), str(threads)],
                          capture_output=True, text=True, check=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def gang(model: str, tp: int, dtype: str, n_new: int, cpus: int) -> dict:
    from raytp.bench.direct import DirectBatch
    from raytp.config import resolve
    from raytp.gang.executor import RayExecutor
    from raytp.messages import SamplingParams

    async def main():
        ex = RayExecutor(resolve({"model": model, "tensor_parallel_size": tp, "device": "cpu", "dtype": dtype,
                                  "num_cpus_per_worker": cpus // tp}))
        t = time.perf_counter()
        reports = await ex.start()
        out = {"start_s": time.perf_counter() - t, "ranks": [vars(r) for r in reports]}
        params = SamplingParams(max_tokens=n_new + 2, temperature=0.0, ignore_eos=True)  # prefill + warm-up + n_new
        import random

        rng = random.Random(0)
        for batch in (1, 8):
            rows = DirectBatch(ex, [tuple(rng.randrange(10, 400) for _ in range(32)) for _ in range(batch)], params,
                               tag=f"b{batch}-")
            await rows.step()  # prefill
            await rows.step()
            t = time.perf_counter()
            for _ in range(n_new):
                await rows.step()
            out[f"tok_s_b{batch}"] = batch * n_new / (time.perf_counter() - t)
            await rows.release()
        # after decoding, so memory-mapped weights that were only touched in forward are counted
        out["memory_after_decode"] = await ex.memory_stats()
        ex.shutdown()
        return out

    return asyncio.run(main())


def serve_to_healthy(model: str, dtype: str) -> float:
    import requests
    from ray import serve

    from raytp.serve.app import build_app

    t = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    serve.run(build_app({"model": model, "tensor_parallel_size": 2, "device": "cpu", "dtype": dtype}),
              name="bench", route_prefix="/")
    while requests.get("http://127.0.0.1:8765/health", timeout=10).status_code != 200:
        time.sleep(0.2)
    elapsed = time.perf_counter() - t
    serve.shutdown()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", action="append", help="built-in preset or checkpoint dir (repeatable)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    models = args.model or ["raytp-tiny-llama"]

    import ray

    from raytp import tiny_model

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    results = {"machine": {"cpus": args.cpus, "processor": platform.processor() or platform.machine()},
               "dtype": args.dtype, "new_tokens": args.new_tokens, "models": {}}
    for model in models:
        path = tiny_model.ensure(model) if model in tiny_model.PRESETS else model
        r = {"hf": hf_baseline(path, args.dtype, args.new_tokens, args.cpus)}
        r["tp1"] = gang(model, 1, args.dtype, args.new_tokens, args.cpus)
        r["tp2"] = gang(model, 2, args.dtype, args.new_tokens, args.cpus)
        r["serve_run_to_healthy_s"] = serve_to_healthy(model, args.dtype)
        results["models"][model] = r
        print(json.dumps({model: r}, indent=1), flush=True)
    ray.shutdown()

    lines = [f"# TP scaling ({args.cpus} CPUs, {args.dtype}, {args.new_tokens} greedy tokens)", "",
             "| model | run | peak RSS per rank (MB) | PSS per rank after decode (MB) | decode tok/s b=1 | "
             "decode tok/s b=8 | b=1 vs HF |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for model, r in results["models"].items():
        hf = r["hf"]
        lines.append(f"| {model} | transformers, 1 process | {hf['peak_rss_mb']:.0f} | {hf['pss_mb']:.0f} | "
                     f"{hf['tok_s_b1']:.1f} | "
                     f"{hf['tok_s_b8']:.1f} | 1.00 |")
        for tp in ("tp1", "tp2"):
            g = r[tp]
            rss = " / ".join(f"{m['peak_rss_mb']:.0f}" for m in g["memory_after_decode"])
            pss = " / ".join(f"{m['pss_mb']:.0f}" for m in g["memory_after_decode"])
            lines.append(f"| {model} | raytp {tp.upper()} | {rss} | {pss} | {g['tok_s_b1']:.1f} | "
                         f"{g['tok_s_b8']:.1f} | {g['tok_s_b1'] / hf['tok_s_b1']:.2f} |")
        lines.append(f"| {model} | serve.run → healthy (TP=2) | | | {r['serve_run_to_healthy_s']:.1f} s | | |")
    _results.write("tp_scaling", results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
