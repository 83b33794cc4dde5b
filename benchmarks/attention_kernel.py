"""The paged attention kernel and the backends on one device, one layer, against FlashAttention (torch SDPA) over
contiguous keys and values holding the same numbers.

    python3 benchmarks/attention_kernel.py --device cuda                       # a GPU: every case, 8B-shaped
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/attention_kernel.py --device cpu --quick   # a rehearsal

Cases, an 8B-shaped layer (32 query heads, 8 kv heads, head dim 128, bf16 on a GPU, blocks of 16 scattered over
the pool): ``b1_2k`` / ``b1_8k`` = one decode row over a 2k / 8k context; ``decode64_2k`` = 64 decode rows over
2k each; ``prefill512`` = a 512-token prompt chunk after 1536 tokens of context. ``--quick`` shrinks contexts
and row counts 16x (the interpreter runs them in seconds); it writes a result only with ``--output``.

Per case: ``reference`` = one SDPA call on contiguous K/V (decode: [rows, 8, context, 128]; prefill: causal
lower-right); ``kernel`` = ``paged_attention`` alone with its default segment policy (or ``--segments``), and
``kernel_1seg`` the single pass (no split-KV) where that splits, ``kernel_wN`` the default at N warps (``--warps``;
on a GPU 8 by default: the other warp count at which a 64-key bf16 tile fits in registers, against the policy's 4);
per backend (``--backends``) the layer's KV write + attention (``backend.forward``). Every output is compared with
the reference: max abs error and ``equal`` (within the dtype's tolerance). Time per call in µs: on CUDA from device
events around a CUDA graph of ``--iters`` calls (what a captured step costs, without Python's launch overhead; eager
events if capture fails, noted as ``timing``), backends eagerly; on CPU the wall-clock median. Decode cases also
report the K+V bytes read per second and, on CUDA, their fraction of ``--peak-tbps`` (an H100/H200's HBM: 3.35 / 4.8
TB/s).
Results: benchmarks/results/attention_kernel_<device>.json and .md, or ``--output PATH`` (JSON; .md beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

HQ, HKV, D, BS = 32, 8, 128, 16
# (name, rows of (query tokens, prior context)); --quick divides every length and row count by QUICK
CASES = [
    ("b1_2k", [(1, 2047)]),
    ("b1_8k", [(1, 8191)]),
    ("decode64_2k", [(1, 2047)] * 64),
    ("prefill512", [(512, 1536)]),
]
QUICK = 16
TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}


def shrink(rows):
    return [(max(1, n // QUICK), start // QUICK) for n, start in rows[:max(1, len(rows) // QUICK)]]


def layout_of(rows, rng: random.Random):
    """The rows' block tables: a random permutation of the pool's blocks (block 0 is the null block)."""
    need = [-(-(start + n) // BS) for n, start in rows]
    blocks = list(range(1, 1 + sum(need)))
    rng.shuffle(blocks)
    layout, at = [], 0
    for (n, start), count in zip(rows, need):
        layout.append((n, start, tuple(blocks[at:at + count])))
        at += count
    return layout, len(blocks) + 1


def timed(fn, device: str, iters: int, graph: bool) -> tuple[float, str]:
    """(µs per call, how it was timed)."""
    import torch

    if device != "cuda":
        fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e6 * statistics.median(times), "wall"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile, allocate, warm caches
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(iters):
                    fn()
            g.replay()
            samples = []
            for _ in range(3):
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                samples.append(1e3 * start.elapsed_time(end) / iters)
            return statistics.median(samples), "graph"
        except Exception as exc:  # noqa: BLE001 - fall back to eager events, and say so
            print(f"  graph capture failed ({type(exc).__name__}: {exc}); timing eagerly", file=sys.stderr)
            torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / iters, "eager"


def reference_fn(layout, q, keys, values, scale: float):
    """SDPA over contiguous K/V gathered from the pool: decode rows batched in one call (all share a length),
    a prompt chunk as one causal lower-right call. Returns (fn, out [T, HQ, D] the fn fills)."""
    import torch
    import torch.nn.functional as F

    def gather(cache, n, start, table):
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(start + n)], device=q.device)
        return cache[slots].transpose(0, 1)  # [HKV, L, D]

    out = torch.empty_like(q)
    if all(n == 1 for n, _, _ in layout):
        assert len({start for _, start, _ in layout}) == 1, "decode rows of one context length"
        k = torch.stack([gather(keys, *row) for row in layout]).contiguous()
        v = torch.stack([gather(values, *row) for row in layout]).contiguous()
        qd = q[:, :, None, :]  # [B, HQ, 1, D]

        def run():
            out.copy_(F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True)[:, :, 0])
        return run, out
    (n, start, table), = layout
    k, v = (gather(c, n, start, table)[None].contiguous() for c in (keys, values))
    qc = q.transpose(0, 1)[None]  # [1, HQ, n, D]
    try:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(n, start + n)
        F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    except Exception:  # noqa: BLE001 - an explicit mask (no flash kernel, but the same numbers)
        mask = torch.arange(start + n, device=q.device)[None, :] <= torch.arange(start, start + n,
                                                                                  device=q.device)[:, None]

    def run():
        out.copy_(F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=scale, enable_gqa=True)[0]
                  .transpose(0, 1))
    return run, out


def run_case(name, rows, args, names, dtype) -> dict:
    import torch

    from raytp.gang import attention

    device, scale = args.device, D ** -0.5
    layout, num_blocks = layout_of(rows, random.Random(0))
    tokens = sum(n for n, _, _ in layout)
    pool = attention.KVPool({0: (HKV, D, dtype)}, num_blocks, BS, device)
    for t in (pool.keys[0], pool.values[0]):
        t.normal_()
    meta = attention.build(layout, BS, device)
    q = torch.randn(tokens, HQ, D, dtype=dtype, device=device)
    # the step's own keys and values are the ones already in their slots: backend.forward rewrites them unchanged
    k, v = pool.keys[0][meta.slot_mapping].clone(), pool.values[0][meta.slot_mapping].clone()
    ref, want = reference_fn(layout, q, pool.keys[0], pool.values[0], scale)
    graph = device == "cuda" and not args.eager
    row = {"tokens": tokens, "rows": len(layout), "context": max(s + n for n, s, _ in layout)}
    row["reference_us"], timing = timed(ref, device, args.iters, graph)
    timings = {timing}
    tol = TOLERANCE[args.dtype]

    def check(prefix, got):
        err = (got.float() - want.float()).abs().max().item()
        row[f"{prefix}_max_abs_err"] = err
        row[f"{prefix}_equal"] = bool(err <= tol)

    if "triton" in names:
        from raytp.gang.attention.triton_kernel import paged_attention, segments_for, sm_count

        row["segments"] = args.segments or segments_for(meta.num_tokens, HKV, num_sms=sm_count(q.device),
                                                        max_kv_len=meta.block_tables.shape[1] * BS)
        variants = [("kernel", row["segments"], None), ("kernel_1seg", 1, None)]
        variants += [(f"kernel_w{warps}", row["segments"], warps) for warps in args.warps]
        for prefix, segments, warps in variants:
            if prefix == "kernel_1seg" and row["segments"] == 1:
                continue
            out = torch.empty_like(q)

            def call(out=out, segments=segments, warps=warps):
                return paged_attention(out, q, pool.keys[0], pool.values[0], meta.query_start_loc, meta.seq_lens,
                                       meta.block_tables, BS, scale, num_segments=segments, num_warps=warps)
            row[f"{prefix}_us"], timing = timed(call, device, args.iters, graph)
            timings.add(timing)
            check(prefix, call())
    for backend_name in names:
        backend = attention.create(backend_name, pool, **({"batch_decode": device != "cpu"}
                                                          if backend_name == "sdpa" else {}))
        backend.prepare(meta, layout)

        def call(backend=backend):
            return backend.forward(0, q, k, v, meta, scale)
        row[f"{backend_name}_us"], _ = timed(call, device, args.iters, False)
        check(backend_name, call())
    row["timing"] = "/".join(sorted(timings))  # reference and kernel; backends: always eager
    if all(n == 1 for n, _, _ in layout):
        kv_bytes = 2 * sum(s + n for n, s, _ in layout) * HKV * D * dtype.itemsize
        row["kv_bytes"] = kv_bytes
        for key in [key for key in row if key.endswith("_us")]:
            gbps = kv_bytes / (row[key] / 1e6) / 1e9
            row[key.replace("_us", "_gbps")] = gbps
            if device == "cuda":
                row[key.replace("_us", "_hbm_fraction")] = gbps / (1e3 * args.peak_tbps)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (float32 on cpu)")
    ap.add_argument("--iters", type=int, default=None, help="calls per timing (default: 20, 3 with --quick)")
    ap.add_argument("--backends", default=None,
                    help="default: sdpa,triton on a GPU; on cpu sdpa, and triton under TRITON_INTERPRET=1")
    ap.add_argument("--cases", default=None, help="comma-separated subset of: " + ",".join(c for c, _ in CASES))
    ap.add_argument("--quick", action="store_true", help=f"every length and row count / {QUICK} (a rehearsal)")
    ap.add_argument("--segments", type=int, default=None,
                    help="the kernel's split-KV segments in every case (default: segments_for's policy)")
    ap.add_argument("--warps", default=None,
                    help="comma-separated num_warps to time the kernel at too, beside launch_config's (default on a "
                         "GPU: 8, the other count at which a 64-key bf16 tile fits in registers; none on cpu)")
    ap.add_argument("--eager", action="store_true", help="on CUDA, time eager calls instead of graph replays")
    ap.add_argument("--peak-tbps", type=float, default=4.8, help="HBM bandwidth for the fraction (H200: 4.8)")
    ap.add_argument("--output", default=None, help="write the JSON here (and the .md beside it)")
    args = ap.parse_args()
    import torch

    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.iters = args.iters or (3 if args.quick else 20)
    args.warps = [int(w) for w in (args.warps or ("8" if args.device != "cpu" else "")).split(",") if w]
    dtype = getattr(torch, args.dtype)
    interpreted = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    default = "sdpa,triton" if args.device != "cpu" or interpreted else "sdpa"
    names = (args.backends or default).split(",")
    wanted = args.cases.split(",") if args.cases else [c for c, _ in CASES]
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
               "dtype": args.dtype, "shape": f"{HQ}/{HKV} heads x {D}, block {BS}", "quick": args.quick,
               "iters": args.iters, "versions": {"torch": torch.__version__}, "cases": {}}
    if "triton" in names:
        import triton

        results["versions"]["triton"] = triton.__version__
    for case, rows in CASES:
        if case not in wanted:
            continue
        row = run_case(case, shrink(rows) if args.quick else rows, args, names, dtype)
        results["cases"][case] = row
        print(case, {key: float(f"{val:.4g}") if isinstance(val, float) else val for key, val in row.items()},
              flush=True)
    results["equal"] = all(val for row in results["cases"].values() for key, val in row.items()
                           if key.endswith("_equal"))

    kernels = ["kernel", "kernel_1seg"] + [f"kernel_w{warps}" for warps in args.warps]
    columns = ["reference"] + (kernels if "triton" in names else []) + names
    lines = [f"One attention layer on {results['device']} ({args.dtype}, {results['shape']}"
             f"{', quick sizes' if args.quick else ''}): µs per call (median of {args.iters}; CUDA: device events "
             "over a graph of the calls), reference = SDPA on contiguous K/V; kernel = paged_attention alone "
             "(default segments; _1seg: single pass; _wN: at N warps); backends = KV write + attention. Decode "
             f"cases: the kernel's K+V read GB/s (on CUDA: the fraction of {args.peak_tbps} TB/s).", "",
             "| case | segments | " + " | ".join(f"{c} µs" for c in columns) + " | kernel K+V GB/s | equal |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " | --- | --- |"]
    for case, row in results["cases"].items():
        cells = [f"{row[f'{c}_us']:.1f}" if f"{c}_us" in row else "-" for c in columns]
        gbps, fraction = row.get("kernel_gbps"), row.get("kernel_hbm_fraction")
        bandwidth = "-" if gbps is None else f"{gbps:.3g}" + (f" ({fraction:.0%})" if fraction else "")
        equal = all(val for key, val in row.items() if key.endswith("_equal"))
        lines.append(f"| {case} | {row.get('segments', '-')} | " + " | ".join(cells) + f" | {bandwidth} | {equal} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    elif args.quick:
        print("\n".join(lines))
    else:
        sys.path.insert(0, HERE)
        from _results import write

        write(f"attention_kernel_{args.device}", results, lines)
    if not results["equal"]:
        sys.exit("some output differs from the reference")


if __name__ == "__main__":
    main()
