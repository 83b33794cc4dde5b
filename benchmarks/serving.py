"""Serving benchmark: continuous batching vs upstream's static batching vs one-at-a-time transformers.

Workload (seeded): N requests from C concurrent clients, prompts of 64–256 random tokens, 32–128 output
tokens with ignore_eos. For each TP size: (a) raytp with continuous batching and (b) the same gang with
the static policy (a batch of ≤ max_num_seqs runs to completion, then the next), both through the real
Serve app over HTTP streaming; once: (c) plain in-process transformers generate, one request at a time
(FIFO behind the same C clients). Reports output tokens/s, TTFT p50/p99 and TPOT p50/p99, and the ratios
the targets are stated in. Results: benchmarks/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

PORT = 8766


def workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(64, 256))], rng.randint(32, 128)) for _ in range(n)]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summarize(ttft: list[float], tpot: list[float], out_tokens: int, wall_s: float) -> dict:
    return {"output_tok_s": out_tokens / wall_s, "wall_s": wall_s, "output_tokens": out_tokens,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tpot_p50_s": pct(tpot, 50),
            "tpot_p99_s": pct(tpot, 99), "ttft_mean_s": statistics.mean(ttft)}


async def drive_http(model: str, work, concurrency: int) -> dict:
    import httpx

    queue = list(enumerate(work))
    ttft, tpot, total = [], [], 0

    async def client(http):
        nonlocal total
        while queue:
            _, (prompt, max_tokens) = queue.pop(0)
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            first, n = None, 0
            async with http.stream("POST", f"http://127.0.0.1:{PORT}/v1/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
                    elif first is None:
                        first = time.perf_counter()
            end = time.perf_counter()
            ttft.append(first - start)
            tpot.append((end - first) / max(1, n - 1))
            total += n

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=None) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return summarize(ttft, tpot, total, time.perf_counter() - start)


def raytp_run(model: str, tp: int, scheduling: str, dtype: str, work, concurrency: int, max_num_seqs: int) -> dict:
    import requests
    from ray import serve

    from raytp.serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app({"model": model, "tensor_parallel_size": tp, "device": "cpu", "dtype": dtype,
                         "num_cpus_per_worker": max(1, (os.cpu_count() or 2) // tp), "scheduling": scheduling,
                         "max_num_seqs": max_num_seqs, "max_model_len": 512}), name="bench", route_prefix="/")
    while requests.get(f"http://127.0.0.1:{PORT}/health", timeout=10).status_code != 200:
        time.sleep(0.2)
    # warm-up outside the measurement
    asyncio.run(drive_http(model, work[:2], 2))
    result = asyncio.run(drive_http(model, work, concurrency))
    serve.shutdown()
    return result


def transformers_run(path: str, dtype: str, work, concurrency: int) -> dict:
    """One request at a time in this process; clients queue FIFO, so waiting counts in their TTFT."""
    import torch
    from transformers import AutoModelForCausalLM

    from raytp.compat import dtype_kwarg

    torch.set_num_threads(os.cpu_count() or 2)
    model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(getattr(torch, dtype))).eval()
    service = []  # (first-token delay, total) per request, served back to back
    with torch.inference_mode():
        for prompt, max_tokens in [work[0]] + list(work):
            ids = torch.tensor([prompt])
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            t2 = time.perf_counter()
            service.append((t1 - t0, t2 - t1, max_tokens))
    service = service[1:]  # drop the warm-up
    # Replay the FIFO queue: request i is sent when its client's previous request finished.
    clock, done_at, ttft, tpot = 0.0, [], [], []
    for i, (first_s, gen_s, n) in enumerate(service):
        sent = done_at[i - concurrency] if i >= concurrency else 0.0
        start = max(clock, sent)
        ttft.append(start - sent + first_s)
        tpot.append((gen_s - first_s) / max(1, n - 1))
        clock = start + gen_s
        done_at.append(clock)
    return summarize(ttft, tpot, sum(n for *_, n in service), clock)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="raytp-llama-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--tp", type=int, action="append", help="TP sizes (default: 1 and 2)")
    ap.add_argument("--continuous-max-num-seqs", type=int, help="max_num_seqs for (a) (default: --max-num-seqs)")
    ap.add_argument("--runs", default="continuous,static,transformers", help="which of the three to run")
    ap.add_argument("--name", default="serving", help="results file name under benchmarks/results/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    wanted = set(args.runs.split(","))
    seqs = {"continuous": args.continuous_max_num_seqs or args.max_num_seqs, "static": args.max_num_seqs}

    import ray
    from transformers import AutoConfig

    from raytp import tiny_model

    path = tiny_model.ensure(args.model) if args.model in tiny_model.PRESETS else args.model
    vocab = min(AutoConfig.from_pretrained(path).vocab_size, 400)
    work = workload(args.num_prompts, args.seed, vocab)
    ray.init(include_dashboard=False, log_to_driver=False)
    runs = {}
    for tp in args.tp or [1, 2]:
        for scheduling in [p for p in ("continuous", "static") if p in wanted]:
            runs[f"tp{tp}_{scheduling}"] = r = raytp_run(args.model, tp, scheduling, args.dtype, work,
                                                         args.max_concurrency, seqs[scheduling])
            print(f"tp{tp} {scheduling}: {json.dumps(r)}", flush=True)
    ray.shutdown()
    if "transformers" in wanted:
        runs["transformers_one_at_a_time"] = r = transformers_run(path, args.dtype, work, args.max_concurrency)
        print(f"transformers: {json.dumps(r)}", flush=True)

    hf = runs.get("transformers_one_at_a_time")
    ratios = {}
    for tp in args.tp or [1, 2]:
        a, b = runs.get(f"tp{tp}_continuous"), runs.get(f"tp{tp}_static")
        if a and b:
            ratios[f"tp{tp}"] = {"throughput_a_over_b": a["output_tok_s"] / b["output_tok_s"],
                                 "ttft_p99_a_over_b": a["ttft_p99_s"] / b["ttft_p99_s"]}
        if a and hf:
            ratios.setdefault(f"tp{tp}", {})["throughput_a_over_c"] = a["output_tok_s"] / hf["output_tok_s"]
    result = {"model": args.model, "dtype": args.dtype, "num_prompts": args.num_prompts,
              "max_concurrency": args.max_concurrency, "max_num_seqs": seqs, "cpus": os.cpu_count(),
              "runs": runs, "ratios": ratios,
              "targets": {"throughput_a_over_b": ">= 2", "ttft_p99_a_over_b": "<= 0.5", "throughput_a_over_c": ">= 4"}}
    lines = [f"# Serving: {args.model} {args.dtype}, {args.num_prompts} requests, {args.max_concurrency} clients, "
             f"prompts 64-256, outputs 32-128 (ignore_eos), {os.cpu_count()} CPUs, max_num_seqs {seqs}", "",
             "| run | output tok/s | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | TPOT p99 (ms) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['output_tok_s']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                     f"{1000 * r['tpot_p50_s']:.0f} | {1000 * r['tpot_p99_s']:.0f} |")
    lines += ["", "| TP | (a)/(b) throughput (target ≥ 2) | (a)/(b) TTFT p99 (target ≤ 0.5) | (a)/(c) throughput (target ≥ 4) |",
              "| --- | --- | --- | --- |"]
    for tp, q in ratios.items():
        cells = [f"{q[k]:.2f}" if k in q else "-" for k in ("throughput_a_over_b", "ttft_p99_a_over_b", "throughput_a_over_c")]
        lines.append(f"| {tp} | " + " | ".join(cells) + " |")
    _results.write(args.name, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
