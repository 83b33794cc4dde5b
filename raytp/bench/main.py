"""``raytp bench``: drive OpenAI-compatible endpoints with one seeded workload and report vLLM's metrics.

Examples:
  raytp bench --base-url http://127.0.0.1:8000 --model raytp-tiny-llama --num-prompts 64 --max-concurrency 8
  raytp bench --model raytp-llama-0.5b --ignore-eos --roofline \\
      --compare tp1=raytp:tensor_parallel_size=1 --compare tp2=raytp:tensor_parallel_size=2 \\
      --compare hf=transformers:dtype=bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time

from raytp.bench import metrics, report, roofline, targets, workload
from raytp.bench.clients import RequestResult


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytp bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server to drive when --compare is not given")
    p.add_argument("--model", default="raytp-tiny-llama", help="model name sent in requests (raytp: the served "
                   "model; also the checkpoint for raytp:/transformers targets and the roofline's weight bytes)")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", default=None,
                   help="most requests in flight; a comma list (1,4,16) sweeps it (default: unbounded)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s of a Poisson arrival process (default inf: all at once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens tokens (vLLM extension)")
    p.add_argument("--dataset-name", choices=("random", "jsonl"), default="random")
    p.add_argument("--dataset-path", help="JSONL prompts for --dataset-name jsonl")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-vocab-size", type=int, default=256, help="token ids are drawn from [10, this)")
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs for goodput, e.g. ttft:500 tpot:50")
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument("--compare", action="append", metavar="NAME=TARGET",
                   help="a target to run the same workload against (repeat); the first is the ratios' baseline. "
                   "TARGET: http(s)://URL | raytp[:key=value,...] | transformers[:dtype=...] | "
                   "transformers-serve[:dtype=...] | engine[:key=value,...] (raytp's engine in process, TP=1) | "
                   "vllm[:venv=...,dtype=...,kv_cache_gb=...] (vLLM's server from its own venv)")
    p.add_argument("--single-stream-prompts", type=int, help="at --max-concurrency 1, send only the first N "
                   "prompts (a single stream is slow; its tok/s needs few)")
    p.add_argument("--roofline", action="store_true", help="also measure single-stream decode vs memory bandwidth")
    p.add_argument("--roofline-output-len", type=int, default=64)
    p.add_argument("--bandwidth-gbps", type=float, help="use this bandwidth (GB/s per device) instead of measuring")
    p.add_argument("--num-warmups", type=int, default=1)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--raytp-port", type=int, default=8765, help="HTTP port for raytp: targets started here")
    p.add_argument("--output-dir", default="bench-results")
    p.add_argument("--result-filename", default="bench", help="stem of the result files")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


async def run_load(client, reqs, delays, concurrency: int | None, desc: str, disable_tqdm: bool):
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(concurrency) if concurrency else None
    bar = tqdm(total=len(reqs), desc=desc, disable=disable_tqdm)
    start = time.perf_counter()

    async def one(req, delay):
        await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
        async with sem or contextlib.nullcontext():
            try:
                r = await client.send(req)
            except Exception as e:  # noqa: BLE001 - recorded as a failed request
                r = RequestResult(False, error=f"{type(e).__name__}: {e}"[:200])
        bar.update(1)
        return r

    results = await asyncio.gather(*(one(r, d) for r, d in zip(reqs, delays)))
    bar.close()
    return results, time.perf_counter() - start


async def bench(args) -> tuple[dict, dict]:
    percentiles = [float(x) for x in args.metric_percentiles.split(",")]
    slos = metrics.parse_goodput(args.goodput)
    concurrencies = [int(c) for c in args.max_concurrency.split(",")] if args.max_concurrency else [None]
    if args.dataset_name == "jsonl":
        if not args.dataset_path:
            raise SystemExit("--dataset-name jsonl needs --dataset-path")
        reqs = workload.jsonl_requests(args.dataset_path, args.num_prompts, args.random_output_len, args.seed)
    else:
        reqs = workload.random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                        args.random_range_ratio, args.random_vocab_size, args.seed)
    delays = workload.send_delays(len(reqs), args.request_rate, args.seed)
    chosen = ([targets.parse(s) for s in args.compare] if args.compare
              else [targets.Target("endpoint", "url", args.base_url)])
    if len({t.name for t in chosen}) != len(chosen):
        raise SystemExit("--compare names must be unique")
    bandwidth: dict[int, float] = {}
    result = {"config": {k: (v if v != float("inf") else "inf") for k, v in vars(args).items()}, "targets": {}}
    samples: dict[str, list[dict]] = {}
    for target in chosen:
        started = time.perf_counter()
        async with targets.open_target(target, model=args.model, ignore_eos=args.ignore_eos, api_key=args.api_key,
                                       port=args.raytp_port) as (client, tp):
            ready_s = time.perf_counter() - started  # a server started here: until it answered (load, compile)
            for req in reqs[:args.num_warmups]:
                await client.send(req)
            runs, samples[target.name] = [], []
            for c in concurrencies:
                n = args.single_stream_prompts if c == 1 and args.single_stream_prompts else len(reqs)
                results, duration = await run_load(client, reqs[:n], delays[:n], c, f"{target.name} c={c}",
                                                   args.disable_tqdm)
                summary = {"max_concurrency": c, **metrics.summarize(results, duration, percentiles, slos)}
                runs.append(summary)
                samples[target.name].append(metrics.samples_ms(results))
                print(f"{target.name} c={c}: {summary['completed']} ok, {summary['failed']} failed, "
                      f"{summary['output_throughput']:.1f} output tok/s, TTFT p50 {summary['median_ttft_ms']:.0f} ms, "
                      f"TPOT p50 {summary['median_tpot_ms']:.1f} ms", flush=True)
            entry = {"kind": target.kind, "tp": tp, "ready_s": round(ready_s, 1), "runs": runs}
            if args.roofline:
                entry["roofline"] = await _roofline(client, tp, args, bandwidth)
            result["targets"][target.name] = entry
    if len(chosen) > 1:
        result["ratios"] = _ratios(result["targets"])
    return result, samples


async def _roofline(client, tp: int, args, bandwidth: dict[int, float]) -> dict:
    path = targets.model_path(args.model)
    if path is None:
        return {"error": f"no local checkpoint for {args.model!r}: weight bytes unknown"}
    prompt = workload.random_requests(1, 16, args.roofline_output_len, 0.0, args.random_vocab_size, args.seed)[0]
    r = await client.send(prompt)
    if not r.ok or r.output_len < 2:
        return {"error": f"single-stream request failed: {r.error or 'fewer than 2 tokens'}"}
    if tp not in bandwidth:
        bandwidth[tp] = (args.bandwidth_gbps * 1e9 * tp if args.bandwidth_gbps
                         else await asyncio.to_thread(roofline.aggregate_bandwidth, tp))
    weights, bw, tok_s = roofline.weight_bytes(path), bandwidth[tp], roofline.decode_tok_s(r)
    return {"tp": tp, "decode_tok_s": tok_s, "weight_bytes": weights, "bandwidth_gbps": bw / 1e9,
            "bandwidth_source": "given" if args.bandwidth_gbps else f"measured, {tp} process(es) copying at once",
            "limit_tok_s": bw / weights, "efficiency": roofline.efficiency(tok_s, weights, bw)}


def _ratios(per_target: dict) -> dict:
    names = list(per_target)
    base = per_target[names[0]]["runs"]
    out = {}
    for name in names[1:]:
        out[name] = {}
        for b, r in zip(base, per_target[name]["runs"]):
            out[name][str(r["max_concurrency"])] = {k: (r[k] / b[k] if b[k] else 0.0) for k, _ in report.KEY_METRICS}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result, samples = asyncio.run(bench(args))
    for path in report.write(result, samples, args.output_dir, args.result_filename):
        print(f"wrote {path}")
    print(report.markdown(result))
    failed = sum(run["failed"] for t in result["targets"].values() for run in t["runs"])
    return 1 if failed and not any(run["completed"] for t in result["targets"].values() for run in t["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
