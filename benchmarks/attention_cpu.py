"""One decode row's attention on CPU: torch's SDPA (its CPU flash kernel) against the sdpa backend's decode path
(``raytp.gang.attention.sdpa._decode_one``: two float32 einsums and a softmax), in one run.

    .venv/bin/python benchmarks/attention_cpu.py

One query token (``--q-heads`` heads, ``--kv-heads`` KV heads, ``--head-dim``), its context a slice of a paged
pool ([slots, kv heads, head dim], as the backend reads it), bf16; microseconds per call (median of
``--repeat`` timings of ``--calls`` calls) at each context length, and the K+V bytes read per microsecond.
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
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from raytp.gang.attention.sdpa import _decode_one

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
    cmd = "python benchmarks/attention_cpu.py" + "".join(f" {a}" for a in sys.argv[1:])
    md = [f"# One decode row's attention on CPU ({hq} query heads, {hkv} KV heads, head dim {d}, bf16, "
          f"{args.threads} threads)", "", f"Command: `{cmd}`", "",
          "| context | torch SDPA µs | _decode_one µs | speed-up | _decode_one K+V GB/s |",
          "| --- | --- | --- | --- | --- |"]
    md += [f"| {r['context']} | {r['sdpa_us']} | {r['decode_one_us']} | {r['speedup']} | {r['decode_one_kv_gb_s']} |"
           for r in rows]
    _results.write("attention_cpu", {"config": vars(args), "results": rows}, md)


if __name__ == "__main__":
    main()
