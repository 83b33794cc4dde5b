"""Decode speed per weight format and TP size on this machine, in one run (issue 12's CPU table).

For each format (the model's dtype, torchao int4 / int8, IPEX-LLM sym_int4 through the ipex-llm environment's
interpreter) and each TP size: a real gang (Ray actors, AutoTP, gloo + shm all-reduce) driven step by step
(``raytp.bench.direct``): seconds to start, weight bytes and peak RSS per rank, greedy decode tok/s at each batch
size; at TP=1 also the perplexity of the loaded shard on a fixed text (the repository's README), and batch-1
decode against the memory-bandwidth roofline (aggregate copy bandwidth of all cores / weight bytes).

    python benchmarks/decode.py --model raytp-llama-0.5b --ipex-python .venv-ipex/bin/python
    python benchmarks/decode.py --formats none --batches 1 --set compile_model=true --transformers \
        --output decode_compiled

``--set`` gives every gang a config field (``compile_model=true``: the compiled step); ``--transformers`` adds plain
transformers eager at batch 1 as the baseline. Each configuration runs in its own process, one after another.
Results: benchmarks/results/decode.{json,md} (``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def perplexity(cfg, text: str, max_tokens: int = 512) -> float:
    """exp(mean next-token NLL) of ``text`` under the loaded (possibly quantized) TP=1 shard."""
    import torch
    from transformers import AutoTokenizer

    from raytp.gang.loader import load_shard

    model = load_shard(cfg, 0, "cpu")
    ids = AutoTokenizer.from_pretrained(cfg.model_path).encode(text)[:max_tokens]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())


def plain_transformers(spec: dict) -> dict:
    """The baseline: the same checkpoint in plain transformers, eager, ``generate`` one row at a time (greedy, a
    static-free dynamic cache, every CPU), the same prompt and token counts as a gang's batch-1 decode."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from raytp import tiny_model
    from raytp.compat import dtype_kwarg

    torch.set_num_threads(spec["cpus"])
    path = tiny_model.ensure(spec["model"]) if spec["model"] in tiny_model.PRESETS else spec["model"]
    model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(getattr(torch, spec["dtype"]))).eval()
    ids = torch.tensor([[random.Random(0).randrange(10, 400) for _ in range(32)]])
    n = spec["new_tokens"]
    kwargs = {"do_sample": False, "min_new_tokens": n, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, **{**kwargs, "min_new_tokens": 4})  # warm-up
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **{**kwargs, "min_new_tokens": 1})  # the prefill alone
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n + 1, **{**kwargs, "min_new_tokens": n + 1})
        decode = time.perf_counter() - t - prefill
    return {"tok_s_b1": round(n / decode, 2)}


def one(spec: dict) -> dict:
    """Run one configuration (in this process): start a gang, decode at each batch size, report."""
    import random

    import ray

    from raytp.bench.direct import DirectBatch
    from raytp.config import resolve
    from raytp.gang.executor import RayExecutor
    from raytp.messages import SamplingParams

    if spec.get("transformers"):
        return plain_transformers(spec)
    cfg = resolve({"model": spec["model"], "tensor_parallel_size": spec["tp"], "device": "cpu",
                   "dtype": spec["dtype"], "num_cpus_per_worker": spec["cpus"] // spec["tp"],
                   "max_num_seqs": max(spec["batches"]), "max_model_len": 512, **spec["format"],
                   **spec.get("set", {})})
    ray.init(address="local", num_cpus=spec["cpus"], include_dashboard=False, log_to_driver=False)

    async def main():
        ex = RayExecutor(cfg)
        t = time.perf_counter()
        reports = await ex.start()
        out = {"start_s": round(time.perf_counter() - t, 1),
               "weight_bytes_per_rank": [r.weight_bytes for r in reports]}
        params = SamplingParams(max_tokens=spec["new_tokens"] + 2, temperature=0.0, ignore_eos=True)
        rng = random.Random(0)
        for b in spec["batches"]:
            rows = DirectBatch(ex, [tuple(rng.randrange(10, 400) for _ in range(32)) for _ in range(b)], params,
                               tag=f"b{b}-")
            await rows.step()  # prefill
            await rows.step()
            t = time.perf_counter()
            for _ in range(spec["new_tokens"]):
                await rows.step()
            out[f"tok_s_b{b}"] = round(b * spec["new_tokens"] / (time.perf_counter() - t), 2)
            await rows.release()
        out["peak_rss_mb_per_rank"] = [round(m["peak_rss_mb"]) for m in await ex.memory_stats()]
        ex.shutdown()
        return out

    out = asyncio.run(main())
    ray.shutdown()
    if spec["tp"] == 1:
        with open(os.path.join(os.path.dirname(HERE), "README.md")) as f:
            out["perplexity"] = round(perplexity(cfg, f.read()), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="raytp-llama-0.5b")
    ap.add_argument("--dtype", default=None, help="default: the cpu 'auto' rule")
    ap.add_argument("--formats", default="none,int4,int8,sym_int4")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeat", type=int, default=1, help="run every configuration this many times, round-robin "
                    "(this host's speed drifts by tens of percent within minutes): each metric is the median")
    ap.add_argument("--ipex-python", default=None, help="interpreter of the ipex-llm environment (for sym_int4)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a config field for every gang (YAML value), e.g. compile_model=true; repeatable")
    ap.add_argument("--transformers", action="store_true",
                    help="also plain transformers eager at batch 1 (the baseline of issue 25's roofline target)")
    ap.add_argument("--output", default="decode", help="result file name under benchmarks/results/")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one))), flush=True)
        return 0
    from raytp.bench.roofline import aggregate_bandwidth
    from raytp.config import cpu_auto_dtype

    dtype = args.dtype or cpu_auto_dtype()
    results = {"model": args.model, "dtype": dtype, "cpus": args.cpus, "argv": sys.argv[1:], "runs": {}}
    every: dict[str, list[dict]] = {}
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    results["set"] = overrides
    for _ in range(args.repeat):
        if args.transformers:
            spec = {"model": args.model, "dtype": dtype, "cpus": args.cpus, "new_tokens": args.new_tokens,
                    "transformers": True}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-1500:]}
            every.setdefault("transformers", []).append(res)
            print(f"plain transformers: {res}", file=sys.stderr, flush=True)
        for fmt in args.formats.split(","):
            fields = {} if fmt == "none" else {"quantization": fmt} if fmt in ("int4", "int8", "fp8") else \
                {"low_bit": fmt}
            python = args.ipex_python if "low_bit" in fields else sys.executable
            if python is None:
                print(f"{fmt}: skipped (needs --ipex-python)", file=sys.stderr)
                continue
            for tp in map(int, args.tp.split(",")):
                spec = {"model": args.model, "tp": tp, "dtype": dtype, "cpus": args.cpus, "format": fields,
                        "batches": [int(b) for b in args.batches.split(",")], "new_tokens": args.new_tokens,
                        "set": overrides}
                t = time.perf_counter()
                proc = subprocess.run([python, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                res = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-1500:]}
                every.setdefault(f"{fmt}/tp{tp}", []).append(res)
                print(f"{fmt} TP={tp}: {res} ({time.perf_counter() - t:.0f}s)", file=sys.stderr, flush=True)
    for key, runs in every.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            results["runs"][key] = runs[-1]
            continue
        merged = dict(ok[-1])
        for metric in [k for k in ok[-1] if k.startswith("tok_s_") or k == "start_s"]:
            merged[metric] = statistics.median(r[metric] for r in ok)
            if len(ok) > 1:
                merged[metric + "_runs"] = [r[metric] for r in ok]
        results["runs"][key] = merged
    bw = aggregate_bandwidth(args.cpus)
    results["bandwidth_gb_s"] = round(bw / 1e9, 2)
    runs = results["runs"]
    hf = runs.pop("transformers", None)
    results["transformers"] = hf
    base = runs.get("none/tp1", {})
    lines = [f"# Decode per weight format ({args.model}, {dtype}, {args.cpus} CPUs, {args.new_tokens} greedy tokens)",
             "", f"Command: `python benchmarks/decode.py {' '.join(sys.argv[1:])}`", "",
             f"Each number is the median of {args.repeat} run(s) of every configuration, round-robin; every run is "
             "in decode.json.", "",
             f"Aggregate copy bandwidth: {bw / 1e9:.1f} GB/s (read + write).", "",
             "| format | TP | start (s) | weights per rank (MB) | peak RSS per rank (MB) | "
             + " | ".join(f"tok/s b={b}" for b in args.batches.split(",")) + " | b=1 vs dtype TP=1 | b=1 roofline | "
             "perplexity |", "| --- " * (8 + len(args.batches.split(","))) + "|"]
    for key, r in runs.items():
        fmt, tp = key.split("/")
        if "error" in r:
            lines.append(f"| {fmt} | {tp[2:]} | error: {r['error'][-200:]!r} |")
            continue
        roof = bw / sum(r["weight_bytes_per_rank"]) if sum(r.get("weight_bytes_per_rank", [])) else None
        rel = r["tok_s_b1"] / base["tok_s_b1"] if base.get("tok_s_b1") and "tok_s_b1" in r else None
        tail = f" | {rel:.2f} | {r['tok_s_b1'] / roof:.2f} |" if rel and roof else " | | |"
        lines.append(
            f"| {dtype if fmt == 'none' else fmt} | {tp[2:]} | {r['start_s']} | "
            f"{' / '.join(f'{w / 2**20:.1f}' for w in r['weight_bytes_per_rank'])} | "
            f"{' / '.join(map(str, r['peak_rss_mb_per_rank']))} | "
            + " | ".join(str(r.get(f"tok_s_b{b}")) for b in args.batches.split(","))
            + tail + f" {r.get('perplexity', '')} |")
    if overrides:
        lines += ["", "Config fields set for every gang: " + ", ".join(f"`{k}: {v}`" for k, v in overrides.items())]
    if hf is not None:
        line = f"plain transformers eager (`generate`, batch 1, {args.cpus} threads): {hf.get('tok_s_b1', hf)} tok/s"
        if "tok_s_b1" in hf:
            line += "; " + ", ".join(f"{k} {r['tok_s_b1'] / hf['tok_s_b1']:.2f}x" for k, r in runs.items()
                                     if "tok_s_b1" in r)
        lines += ["", line]
    _results.write(args.output, results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
