"""The engine core in one process, without Ray, on any device: raytp's engine (paged KV cache, chunked prefill,
prefix caching) against transformers' own continuous batching (paged attention) on the same model and workload.

    python benchmarks/engine.py --device cpu --model raytp-llama-0.5b --concurrency 16
    python benchmarks/engine.py --device cuda --dtype bfloat16          # an 8B-shaped random Llama, built on the GPU
    python benchmarks/engine.py --device cuda --targets decode --quantization int4 --enforce-eager

Each target runs in its own subprocess (clean peak memory, no shared state):
  decode      --decode-batches requests at once (prompts of --decode-context tokens, 32 by default; --decode-tokens
              each): decode tok/s per batch size (batch / TPOT p50), batch 1 against the memory-bandwidth roofline,
              engine start-up seconds (CUDA graph capture included) and weight bytes. Roofline: measured device copy
              bandwidth (read + write counted, ``raytp bench --roofline``'s convention) / bytes one batch-1 token
              reads = weight bytes as stored + the K/V bytes of its context (layers x 2 x kv heads x head dim x
              dtype size x context, at the mean context of the measured tokens: prompt + decode tokens / 2);
              at the default 32-token prompts the K/V term is < 0.1 % of an 8B model's weights, at 2k it is ~1.7 %;
  raytp / hf  ``--concurrency`` requests at once, prompts 128–512 random tokens, outputs 128–256 (ignore_eos):
              output tok/s, TTFT and TPOT p50/p99, peak memory; hf = transformers' ContinuousBatchingManager (what
              ``generate_batch`` runs), each request with its own max_new_tokens;
  prefix_on / prefix_off  a shared 1,000-token system prompt + short user turns (``--prefix-requests`` requests,
              each sent when the previous one finished, as turns are): TTFT p50 with and without prefix caching.
Imports no Ray. Results: benchmarks/results/engine_<device>.json and .md (printed), or --output: a name there, or a
path ending in .json (the .md beside it). Ratios are within one run. Timing: each token is timed when it reaches
the consumer (the caller of ``generate``), with no device synchronisation in between: a token id on the host means
its step's device work is done, and a synchronise on the event loop would stall the engine's next launch, which is
what async scheduling overlaps (``--sync-scheduling`` compares). A target's stderr streams through as it runs, so a
target killed by a timeout still leaves its log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # raytp from this checkout


# ---- model and device ---------------------------------------------------------------------------------
def build_model(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raytp import tiny_model
    from raytp.compat import dtype_kwarg

    dtype = getattr(torch, args.dtype)
    if args.model:
        path = tiny_model.ensure(args.model) if args.model in tiny_model.PRESETS else args.model
        model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(dtype)).to(args.device).eval()
    else:
        cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, vocab_size=args.vocab, max_position_embeddings=4096,
                          initializer_range=0.02)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(cfg, **dtype_kwarg(dtype)).eval()
    if args.quantization:  # what a rank's loader does after moving its shard to the device
        from raytp.gang.loader import quantize_shard

        quantize_shard(model, args.quantization, args.device)
    return model


def sync(device: str) -> None:
    import torch

    if device != "cpu":
        getattr(torch, device.split(":")[0]).synchronize()


def bandwidth(device: str, size_mb: int = 1024) -> float:
    """Best-of-5 bytes/s of a device-to-device copy (read + write counted)."""
    import torch

    src = torch.empty(size_mb << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = max(best, 2 * src.numel() / (time.perf_counter() - t))
    return best


def kv_bytes_per_token(config, dtype: str, context: float) -> int:
    """K and V bytes one decoded token reads from the cache at ``context`` tokens (the cache holds the model's
    dtype): layers x 2 x kv heads x head dim x dtype size x context."""
    import torch

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    itemsize = getattr(torch, dtype).itemsize
    return int(config.num_hidden_layers * 2 * kv_heads * head_dim * itemsize * context)


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cpu":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return getattr(torch, device.split(":")[0]).max_memory_allocated() / 2**20


class NumberTokenizer:
    """Enough of a tokenizer for the engine when the model has no real one: token ids as text, ``vocab_size``
    of them (the engine refuses prompt ids outside its tokenizer)."""

    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text, add_special_tokens=False):
        return [1, 2]

    def decode(self, ids, **_):
        return "".join(f"<{i}>" for i in ids)


# ---- workloads ------------------------------------------------------------------------------------------
def concurrent_workload(n: int, vocab: int, seed: int):
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab - 1) for _ in range(rng.randint(128, 512))], rng.randint(128, 256))
            for _ in range(n)]


def prefix_workload(n: int, vocab: int, seed: int):
    rng = random.Random(seed + 1)
    system = [rng.randrange(10, vocab - 1) for _ in range(1000)]
    return [(system + [rng.randrange(10, vocab - 1) for _ in range(rng.randint(10, 40))], 8) for _ in range(n)]


def summarize(results, wall_s: float, device: str) -> dict:
    """``results``: per request (arrival, token times). TPOT = mean gap after the first token, per request."""
    ttft = sorted(times[0] - arrival for arrival, times in results)
    tpot = sorted((times[-1] - times[0]) / (len(times) - 1) for _, times in results if len(times) > 1)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None  # noqa: E731
    out_tokens = sum(len(times) for _, times in results)
    return {"requests": len(results), "output_tokens": out_tokens, "wall_s": round(wall_s, 2),
            "output_tok_s": round(out_tokens / wall_s, 2), "ttft_p50_s": q(ttft, 0.5), "ttft_p99_s": q(ttft, 0.99),
            "tpot_p50_ms": q(tpot, 0.5) and q(tpot, 0.5) * 1e3, "tpot_p99_ms": q(tpot, 0.99) and q(tpot, 0.99) * 1e3,
            "peak_memory_mb": round(peak_memory_mb(device), 1)}


# ---- targets (each runs in its own process) ----------------------------------------------------------------
def raytp_engine(args, model, **overrides):
    from raytp.config import RaytpConfig, ResolvedConfig
    from raytp.engine.engine import make_engine
    from raytp.gang.local import LocalExecutor

    base = RaytpConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       kv_cache_memory_bytes=args.kv_cache_gb << 30 if args.kv_cache_gb else None,
                       enforce_eager=args.enforce_eager, attention_backend=args.attention_backend,
                       async_scheduling=not args.sync_scheduling, **overrides)
    fields = {f: getattr(base, f) for f in ResolvedConfig.__dataclass_fields__ if hasattr(base, f)}
    cfg = ResolvedConfig(**{**fields, "model_path": args.model or "random", "served_model_name": "bench",
                            "tensor_parallel_size": 1, "device": args.device.split(":")[0], "dtype": args.dtype,
                            "max_model_len": max(4096, args.decode_context + args.decode_tokens + 16)})
    return make_engine(cfg, LocalExecutor(cfg, model=model), NumberTokenizer(model.config.vocab_size))


async def run_raytp(engine, workload, device: str, sequential: bool = False):
    from raytp.messages import SamplingParams

    async def one(i, prompt, n):
        arrival, times = time.perf_counter(), []
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        # timed on arrival: no synchronise here (the token ids are on the host, so their step is done; a
        # synchronise on the event loop would hold back the engine's next launch)
        async for out in engine.generate(f"r{i}", tuple(prompt), params):
            times += [time.perf_counter()] * len(out.token_ids)
        return arrival, times

    start = time.perf_counter()
    if sequential:
        results = [await one(i, p, n) for i, (p, n) in enumerate(workload)]
    else:
        results = await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(workload)))
    sync(device)  # the run's one boundary: nothing it launched is still running when the wall clock stops
    return summarize(results, time.perf_counter() - start, device)


def target(args) -> dict:
    import torch

    from raytp.bench.roofline import efficiency

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count())
    model = build_model(args)
    vocab = model.config.vocab_size
    if args.target == "hf":
        return run_hf(args, model, concurrent_workload(args.concurrency, vocab, args.seed))

    async def main():
        if args.target == "decode":
            from raytp.gang.report import weight_bytes

            engine = raytp_engine(args, model)
            t = time.perf_counter()
            await engine.start()
            name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
            report = engine.load_reports[0]
            out = {"device_name": name, "start_s": round(time.perf_counter() - t, 2), "decode_mode": report.decode_mode,
                   "decode_warm_up_s": round(report.decode_warm_up_s, 2)}
            await run_raytp(engine, [([5] * args.decode_context, 8)], args.device)  # warm-up, at the measured context
            for b in map(int, args.decode_batches.split(",")):
                rng = random.Random(b)
                work = [([rng.randrange(10, vocab - 1) for _ in range(args.decode_context)], args.decode_tokens)
                        for _ in range(b)]
                res = await run_raytp(engine, work, args.device)
                out[f"tok_s_b{b}"] = round(b * 1e3 / res["tpot_p50_ms"], 2)
            engine.shutdown()
            weights = weight_bytes(model)
            kv = kv_bytes_per_token(model.config, args.dtype, args.decode_context + args.decode_tokens / 2)
            bw = bandwidth(args.device)
            # the convention of raytp.bench.roofline (and `raytp bench --roofline`): copy bandwidth, read + write;
            # the bytes of one batch-1 token: its weights and the K/V of its context (module docstring)
            out.update({"decode_context": args.decode_context, "weight_bytes": weights, "kv_bytes_per_token_b1": kv,
                        "bandwidth_gb_s": round(bw / 1e9, 1), "roofline_tok_s": round(bw / (weights + kv), 2),
                        "peak_memory_mb": round(peak_memory_mb(args.device))})
            if "tok_s_b1" in out:
                out["roofline_efficiency_b1"] = round(efficiency(out["tok_s_b1"], weights + kv, bw), 3)
            return out
        if args.target == "raytp":
            engine = raytp_engine(args, model)
            await engine.start()
            await run_raytp(engine, concurrent_workload(2, vocab, args.seed + 7), args.device)  # warm-up
            res = await run_raytp(engine, concurrent_workload(args.concurrency, vocab, args.seed), args.device)
        else:  # prefix_on / prefix_off
            engine = raytp_engine(args, model, enable_prefix_caching=args.target == "prefix_on")
            await engine.start()
            res = await run_raytp(engine, prefix_workload(args.prefix_requests, vocab, args.seed), args.device,
                                  sequential=True)
            res["prefix_cache_hit_rate"] = round(engine.status().prefix_cache_hit_rate, 3)
        res["num_preemptions"] = engine.status().num_preemptions
        engine.shutdown()
        return res

    return asyncio.run(main())


def run_hf(args, model, workload) -> dict:
    """transformers' continuous batching (paged attention; what generate_batch runs), per-request lengths."""
    import torch
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max(n for _, n in workload), do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    # no_grad, not inference_mode: the manager's thread updates cache tensors created here (transformers 5.17 fails)
    with torch.no_grad(), model.continuous_batching_context_manager(generation_config=gen, block=True,
                                                                               timeout=5) as manager:
        warm = manager.add_request([5] * 16, request_id="warm", max_new_tokens=4)
        while (r := manager.get_result(timeout=60)) is None or r.request_id != warm or not r.is_finished():
            pass
        start = time.perf_counter()
        for i, (prompt, n) in enumerate(workload):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, record_timestamps=True)
        done = {}
        while len(done) < len(workload):
            r = manager.get_result(timeout=600)
            if r is None:
                raise RuntimeError("transformers' continuous batching stopped before finishing the workload")
            if r.is_finished():
                done[r.request_id] = r
        wall = time.perf_counter() - start
    results = [(start, list(r.timestamps)) for r in done.values()]
    out = summarize(results, wall, args.device)
    out["lengths_ok"] = all(len(done[f"r{i}"].generated_tokens) == n for i, (_, n) in enumerate(workload))
    return out


# ---- driver -----------------------------------------------------------------------------------------------
def run_streaming(argv: list[str], prefix: str) -> tuple[int, str, str]:
    """Run a target: its stderr goes on to ours line by line as it comes (kept in the caller's log even if a
    timeout kills us both), and is also returned with its stdout."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kept: list[str] = []

    def forward():
        for line in proc.stderr:
            kept.append(line)
            sys.stderr.write(prefix + line)
            sys.stderr.flush()

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    return proc.returncode, stdout, "".join(kept)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | xpu")
    ap.add_argument("--model", default=None, help="checkpoint dir or built-in name; default: a random Llama of the "
                    "shape below, built directly on the device")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on accelerators; on cpu the 'auto' rule")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: --concurrency")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--kv-cache-gb", type=int, default=None)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-batches", default="1,8,16", help="batch sizes of the decode target")
    ap.add_argument("--decode-context", type=int, default=32, help="prompt tokens of each decode-target request "
                    "(the context its decode steps read; 2048 for batch 1 at a 2k context)")
    ap.add_argument("--quantization", default=None, help="torchao format (int4, int8, fp8), as the config field")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (the config field)")
    ap.add_argument("--attention-backend", default="auto", help="auto | sdpa | triton (the config field)")
    ap.add_argument("--sync-scheduling", action="store_true", help="async_scheduling: false (one step at a time)")
    ap.add_argument("--prefix-requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="results file name under benchmarks/results (default "
                    "engine_<device>), or a path ending in .json")
    ap.add_argument("--targets", default="decode,raytp,hf,prefix_on,prefix_off")
    ap.add_argument("--repeat", type=int, default=1, help="run the raytp / hf pair this many times, alternating "
                    "(this host's speed drifts: each pair's ratio is reported, and their median)")
    ap.add_argument("--target", default=None, help=argparse.SUPPRESS)  # internal: run one target, print JSON
    args = ap.parse_args()
    if args.dtype is None:
        from raytp.config import cpu_auto_dtype

        args.dtype = cpu_auto_dtype() if args.device == "cpu" else "bfloat16"
    args.max_num_seqs = args.max_num_seqs or args.concurrency
    if args.target:
        print("RESULT " + json.dumps(target(args)))
        return 0

    results: dict = {"device": args.device, "dtype": args.dtype, "quantization": args.quantization,
                     "enforce_eager": args.enforce_eager, "attention_backend": args.attention_backend,
                     "async_scheduling": not args.sync_scheduling,
                     "model": args.model or (
        f"random Llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"vocab={args.vocab}"), "concurrency": args.concurrency, "argv": sys.argv[1:]}
    names = args.targets.split(",")
    order = [n for n in names if n not in ("raytp", "hf")]
    pair = [n for n in ("raytp", "hf") if n in names]
    order[1:1] = pair * args.repeat  # after decode, alternating
    runs: dict[str, list] = {}
    for name in order:
        argv = [sys.executable, __file__, *sys.argv[1:], "--target", name]
        t = time.perf_counter()
        returncode, stdout, stderr = run_streaming(argv, f"[{name}] ")
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        if returncode or not lines:
            text = stderr or stdout
            causes = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln][:20]
            result = {"error": text[-2000:], "error_lines": causes}
        else:
            result = json.loads(lines[-1][len("RESULT "):])
        runs.setdefault(name, []).append(result)
        results[name] = result
        print(f"{name}: {result} ({time.perf_counter() - t:.0f}s)", file=sys.stderr, flush=True)
    if args.repeat > 1 and len(pair) == 2:
        ratios = [r["output_tok_s"] / h["output_tok_s"] for r, h in zip(runs["raytp"], runs["hf"])
                  if "error" not in r and "error" not in h]
        results["raytp_over_hf_tok_s_per_pair"] = [round(x, 2) for x in ratios]
        results["raytp_runs"], results["hf_runs"] = runs["raytp"], runs["hf"]

    ok = lambda k: k in results and "error" not in results[k]  # noqa: E731
    if "raytp_over_hf_tok_s_per_pair" in results:
        results["raytp_over_hf_tok_s"] = round(statistics.median(results["raytp_over_hf_tok_s_per_pair"]), 2)
    elif ok("raytp") and ok("hf"):
        results["raytp_over_hf_tok_s"] = round(results["raytp"]["output_tok_s"] / results["hf"]["output_tok_s"], 2)
    if ok("prefix_on") and ok("prefix_off"):
        on, off = results["prefix_on"]["ttft_p50_s"], results["prefix_off"]["ttft_p50_s"]
        results["prefix_ttft_p50_ratio"] = round(on / off, 3)
    sys.path.insert(0, HERE)
    import _results  # noqa: E402 - benchmarks/ helper

    name = args.output or f"engine_{args.device.split(':')[0]}"
    lines = [f"# Engine benchmark ({args.device}, {args.dtype}, {results['model']})", "",
             f"Command: `python benchmarks/engine.py {' '.join(sys.argv[1:])}`", ""]
    for key in ("decode", "raytp", "hf", "prefix_on", "prefix_off"):
        if key in results:
            fields = ", ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in results[key].items())
            lines.append(f"- **{key}**{' (last run)' if key in pair and args.repeat > 1 else ''}: {fields}")
    for key in ("raytp_over_hf_tok_s_per_pair", "raytp_over_hf_tok_s", "prefix_ttft_p50_ratio"):
        if key in results:
            lines.append(f"- **{key}**: {results[key]}")
    if name.endswith(".json"):  # a path: this run's files only, wherever the caller keeps them
        os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
        with open(name, "w") as f:
            json.dump(results, f, indent=2)
        with open(name[:-len(".json")] + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    else:
        _results.write(name, results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
