"""Attention on CPU, torch's SDPA (its CPU flash kernel) against the sdpa backend's own paths, in one run: one decode
row (``raytp.gang.attention.sdpa._decode_one``: two float32 einsums and a softmax), and a prompt chunk's rows
(``_prefill_tiles``: query tiles at fixed positions, what makes a prompt's numbers independent of its chunks).

    .venv/bin/python benchmarks/attention_cpu.py

One query token (``--q-heads`` heads, ``--kv-heads`` KV heads, ``--head-dim``), its context a slice of a paged
pool ([slots, kv heads, head dim], as the backend reads it), bf16; microseconds per call (median of
``--repeat`` timings of ``--calls`` calls) at each context length, and the K+V bytes read per microsecond.
Prompt chunks (``--chunks``, queries@first position): a first chunk (SDPA causal) or a later one over its cached
context (SDPA with a mask), milliseconds per call.
Results: benchmarks/results/attention_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def time_us(fn, calls: int, repeat: int) -> float:
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="128,512,2048,8192")
    p.add_argument("--chunks", default="128@0,512@0,17@500,100@900,512@1536")
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from raytp.gang.attention.sdpa import _decode_one, _prefill_tiles

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    rows = []
    with torch.inference_mode():
        for ctx in map(int, args.contexts.split(",")):
            pool_k, pool_v = (torch.randn(ctx + 32, hkv, d, generator=gen).bfloat16() for _ in range(2))
            k, v = pool_k[16:16 + ctx], pool_v[16:16 + ctx]  # a slice of the pool, as a row's view
            q = torch.randn(hq, d, generator=gen).bfloat16()
            qh, kh, vh = q[None, :, None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            sdpa = time_us(lambda: F.scaled_dot_product_attention(qh, kh, vh, scale=d ** -0.5, enable_gqa=hq != hkv),
                           args.calls, args.repeat)
            ours = time_us(lambda: _decode_one(q, k, v, d ** -0.5), args.calls, args.repeat)
            kv_bytes = 2 * ctx * hkv * d * 2
            rows.append({"context": ctx, "sdpa_us": round(sdpa, 1), "decode_one_us": round(ours, 1),
                         "speedup": round(sdpa / ours, 2), "decode_one_kv_gb_s": round(kv_bytes / ours / 1e3, 2)})
            print(rows[-1], flush=True)
        chunks = []
        for spec in args.chunks.split(","):
            n, start = map(int, spec.split("@"))
            q = torch.randn(n, hq, d, generator=gen).bfloat16()
            k, v = (torch.randn(start + n, hkv, d, generator=gen).bfloat16() for _ in range(2))
            mask = None if start == 0 else torch.arange(start + n)[None, :] <= torch.arange(start, start + n)[:, None]
            qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
            sdpa = time_us(lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=start == 0,
                                                                  scale=d ** -0.5, enable_gqa=hq != hkv),
                           max(1, args.calls // 10), args.repeat) / 1e3
            tiles = time_us(lambda: _prefill_tiles(q, k, v, start, d ** -0.5), max(1, args.calls // 10),
                            args.repeat) / 1e3
            chunks.append({"queries": n, "first_position": start, "sdpa_ms": round(sdpa, 2),
                           "prefill_tiles_ms": round(tiles, 2), "ratio": round(tiles / sdpa, 2)})
            print(chunks[-1], flush=True)
    cmd = "python benchmarks/attention_cpu.py" + "".join(f" {a}" for a in sys.argv[1:])
    md = [f"# Attention on CPU ({hq} query heads, {hkv} KV heads, head dim {d}, bf16, "
          f"{args.threads} threads)", "", f"Command: `{cmd}`", "",
          "| context | torch SDPA µs | _decode_one µs | speed-up | _decode_one K+V GB/s |",
          "| --- | --- | --- | --- | --- |"]
    md += [f"| {r['context']} | {r['sdpa_us']} | {r['decode_one_us']} | {r['speedup']} | {r['decode_one_kv_gb_s']} |"
           for r in rows]
    md += ["", "A prompt chunk's rows (the same heads), ms per call:", "",
           "| queries | first position | torch SDPA ms | _prefill_tiles ms | tiles / SDPA |",
           "| --- | --- | --- | --- | --- |"]
    md += [f"| {c['queries']} | {c['first_position']} | {c['sdpa_ms']} | {c['prefill_tiles_ms']} | {c['ratio']} |"
           for c in chunks]
    _results.write("attention_cpu", {"config": vars(args), "results": rows, "prefill": chunks}, md)


if __name__ == "__main__":
    main()
