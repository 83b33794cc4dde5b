"""Serving benchmark: continuous batching vs upstream's static batching vs one-at-a-time transformers.

A `raytp bench --compare` run with a fixed scenario, plus the ratios its targets are stated in: one seeded
workload of N requests from C concurrent clients, prompts of 64–256 random tokens, 32–128 output tokens
(ignore_eos), streamed over HTTP. For each TP size: (a) raytp with continuous batching and (b) the static
policy (a batch of ≤ max_num_seqs runs to completion, then the next), each through the real Serve app;
once: (c) in-process transformers generate, one request at a time behind the same C clients. Metrics and
percentiles are `raytp bench`'s (vLLM's definitions). Results: benchmarks/results/<name>.{json,md} and
`raytp bench`'s own files (<name>_bench.*).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

# The workload, as `raytp bench --random-*` flags: prompts 160 ± 60 % (64–256) tokens, outputs 80 ± 60 % (32–128).
INPUT_LEN, OUTPUT_LEN, RANGE_RATIO, VOCAB = 160, 80, 0.6, 400


def requests(num_prompts: int, seed: int):
    """The scenario's requests (what `raytp bench` sends for ``bench_argv``'s flags)."""
    from raytp.bench import workload

    return workload.random_requests(num_prompts, INPUT_LEN, OUTPUT_LEN, RANGE_RATIO, VOCAB, seed)


def bench_argv(args) -> list[str]:
    """The `raytp bench` command line of this scenario."""
    seqs = {"continuous": args.continuous_max_num_seqs or args.max_num_seqs, "static": args.max_num_seqs}
    argv = ["--model", args.model, "--num-prompts", str(args.num_prompts), "--max-concurrency",
            str(args.max_concurrency), "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN),
            "--random-range-ratio", str(RANGE_RATIO), "--random-vocab-size", str(VOCAB), "--ignore-eos",
            "--seed", str(args.seed),
            "--num-warmups", "2", "--output-dir", _results.RESULTS, "--result-filename", f"{args.name}_bench",
            "--disable-tqdm"]
    for tp in args.tp or [1, 2]:
        for policy in [p for p in ("continuous", "static") if p in args.runs]:
            opts = f"tensor_parallel_size={tp},scheduling={policy},max_num_seqs={seqs[policy]},max_model_len=512"
            opts += f",dtype={args.dtype}"
            argv += ["--compare", f"tp{tp}_{policy}=raytp:{opts}"]
    # TP=2 with the device's scheduling defaults, as serve_config.yaml; eager and with a separate ingress (the
    # config's defaults): peers.py runs serve_config.yaml's args as they are (in_server, compile_model)
    if "default" in args.runs.split(","):
        argv += ["--compare", f"default=raytp:tensor_parallel_size=2,max_model_len=512,dtype={args.dtype}"]
    if "transformers-serve" in args.runs.split(","):
        argv += ["--compare", f"transformers_serve=transformers-serve:dtype={args.dtype}"]
    if "transformers" in args.runs.split(","):
        argv += ["--compare", f"transformers=transformers:dtype={args.dtype}"]
    return argv


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="raytp-llama-0.5b")
    ap.add_argument("--dtype", default=None, help="dtype of every target (default: raytp's CPU rule: bfloat16 "
                    "where the CPU has native bf16, else float32)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--continuous-max-num-seqs", type=int, help="max_num_seqs for (a) (default: --max-num-seqs)")
    ap.add_argument("--tp", type=int, action="append", help="TP sizes (default: 1 and 2)")
    ap.add_argument("--runs", default="continuous,static,transformers", help="which to run, of: continuous, "
                    "static (per --tp), default (TP=2 and the device's scheduling defaults, eager), "
                    "transformers-serve (`transformers serve --continuous-batching`), transformers (one request at a "
                    "time, in process)")
    ap.add_argument("--name", default="serving", help="results file name under benchmarks/results/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from raytp.bench import main as bench_main
    from raytp.bench import report
    from raytp.config import cpu_auto_dtype

    args.dtype = args.dtype or cpu_auto_dtype()  # the same for every target, as raytp's dtype: auto

    argv = bench_argv(args)
    print("raytp bench " + " ".join(argv), flush=True)
    bench_args = bench_main.parser().parse_args(argv)
    result, samples = asyncio.run(bench_main.bench(bench_args))
    report.write(result, samples, bench_args.output_dir, bench_args.result_filename)
    runs = {name: t["runs"][0] for name, t in result["targets"].items()}
    failed = {name: r["failed"] for name, r in runs.items() if r["failed"]}
    if failed:  # ratios of partial runs would mislead
        print(f"requests failed: {failed}; errors: {[r['errors'] for r in runs.values() if r['failed']]}")
        return 1

    hf = runs.get("transformers")
    ratios = {}
    tfs = runs.get("transformers_serve")
    if tfs:  # raytp configs against transformers' own continuous-batching server
        ratios["over_transformers_serve"] = {name: r["output_throughput"] / tfs["output_throughput"]
                                             for name, r in runs.items() if name != "transformers_serve"}
    for tp in args.tp or [1, 2]:
        a, b = runs.get(f"tp{tp}_continuous"), runs.get(f"tp{tp}_static")
        q = ratios[f"tp{tp}"] = {}
        if a and b:
            q["throughput_a_over_b"] = a["output_throughput"] / b["output_throughput"]
            q["ttft_p99_a_over_b"] = a["p99_ttft_ms"] / b["p99_ttft_ms"]
        if a and hf:
            q["throughput_a_over_c"] = a["output_throughput"] / hf["output_throughput"]
    out = {"command": "benchmarks/serving.py " + " ".join(sys.argv[1:]), "raytp_bench_argv": argv,
           "cpus": os.cpu_count(), "runs": runs, "ratios": ratios}
    lines = [f"# Serving: {args.model}, {args.num_prompts} requests, {args.max_concurrency} clients, prompts 64-256, "
             f"outputs 32-128 (ignore_eos), {os.cpu_count()} CPUs", "",
             f"Command: `.venv/bin/python {out['command']}` (runs `raytp bench {' '.join(argv)}`)", "",
             "| run | completed | failed | output tok/s | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | "
             "TPOT p99 (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['completed']} | {r['failed']} | {r['output_throughput']:.1f} | "
                     f"{r['median_ttft_ms'] / 1000:.2f} | {r['p99_ttft_ms'] / 1000:.2f} | {r['median_tpot_ms']:.0f} | "
                     f"{r['p99_tpot_ms']:.0f} |")
    if tfs:
        lines += ["", "Output tok/s over `transformers serve --continuous-batching`: " + ", ".join(
            f"{name} {x:.2f}×" for name, x in ratios["over_transformers_serve"].items())]
    lines += ["", "| TP | (a)/(b) throughput | (a)/(b) TTFT p99 | (a)/(c) throughput |", "| --- | --- | --- | --- |"]
    for tp, q in ratios.items():
        if not tp.startswith("tp"):
            continue
        cells = [f"{q[k]:.2f}" if k in q else "-" for k in ("throughput_a_over_b", "ttft_p99_a_over_b",
                                                              "throughput_a_over_c")]
        lines.append(f"| {tp} | " + " | ".join(cells) + " |")
    _results.write(args.name, out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
