"""The attention backends on one device, one layer, against torch's SDPA over contiguous (unpaged) tensors.

    python benchmarks/attention_kernel.py --device cuda            # on a GPU: sdpa and triton backends
    .venv/bin/python benchmarks/attention_kernel.py --device cpu   # the sdpa backend only (Triton needs a GPU)

Two steps, an 8B-shaped layer (32 query heads, 8 kv heads, head dim 128, bf16, blocks of 16 scattered over
the pool): ``decode`` = 64 rows of one token over 512-token contexts; ``mixed`` = 4 prompt chunks of 256
tokens (from positions 0, 128, 256, 384) and 60 decode rows over 512. Per backend: the layer's KV write + attention
(``backend.prepare`` once, as per step), median of ``--iters``; the reference is one SDPA call per step shape
on contiguous keys (decode: all rows padded to 512 in one call; mixed: one call per chunk + one for the decode
rows), which reads no block table. Decode also reports the K/V bytes read per second. Results:
benchmarks/results/attention_kernel_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

HQ, HKV, D, BS = 32, 8, 128, 16


def steps():
    """(name, layout) with tables of scattered blocks (a random permutation of the pool)."""
    rng = random.Random(0)
    decode = [(1, 511, None) for _ in range(64)]
    mixed = [(256, start, None) for start in (0, 128, 256, 384)] + [(1, 511, None) for _ in range(60)]
    out = []
    for name, rows in (("decode", decode), ("mixed", mixed)):
        blocks = list(range(1, 1 + sum(-(-(s + n) // BS) for n, s, _ in rows)))
        rng.shuffle(blocks)
        layout, at = [], 0
        for n, s, _ in rows:
            k = -(-(s + n) // BS)
            layout.append((n, s, tuple(blocks[at:at + k])))
            at += k
        out.append((name, layout, len(blocks) + 1))
    return out


def timed(fn, device, iters: int) -> float:
    import torch

    sync = getattr(torch, device).synchronize if device != "cpu" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference(layout, q, dtype, device):
    """SDPA on contiguous tensors of the same shapes: what attention costs with no paging at all."""
    import torch
    import torch.nn.functional as F

    chunks = [(n, s) for n, s, _ in layout if n > 1]
    decodes = [s + 1 for n, s, _ in layout if n == 1]
    ks = [(torch.randn(1, HKV, s + n, D, dtype=dtype, device=device),) * 2 for n, s in chunks]
    kd = torch.randn(len(decodes), HKV, max(decodes), D, dtype=dtype, device=device) if decodes else None
    qd = torch.randn(len(decodes), HQ, 1, D, dtype=dtype, device=device)
    qc = [torch.randn(1, HQ, n, D, dtype=dtype, device=device) for n, _ in chunks]
    masks = [torch.arange(s + n, device=device)[None, :] <= torch.arange(s, s + n, device=device)[:, None]
             for n, s in chunks]

    def run():
        for qi, (k, v), m in zip(qc, ks, masks):
            F.scaled_dot_product_attention(qi, k, v, attn_mask=m, enable_gqa=True)
        if kd is not None:
            F.scaled_dot_product_attention(qd, kd, kd, enable_gqa=True)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--backends", default=None, help="default: sdpa,triton on a GPU, sdpa on cpu")
    args = ap.parse_args()
    import torch

    from raytp.gang import attention

    dtype = getattr(torch, args.dtype)
    names = (args.backends or ("sdpa" if args.device == "cpu" else "sdpa,triton")).split(",")
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
               "dtype": args.dtype, "shape": f"{HQ}/{HKV} heads x {D}, block {BS}", "steps": {}}
    for step_name, layout, num_blocks in steps():
        tokens = sum(n for n, _, _ in layout)
        q = torch.randn(tokens, HQ, D, dtype=dtype, device=args.device)
        k = torch.randn(tokens, HKV, D, dtype=dtype, device=args.device)
        v = torch.randn(tokens, HKV, D, dtype=dtype, device=args.device)
        row = {"reference_ms": 1e3 * timed(reference(layout, q, dtype, args.device), args.device, args.iters)}
        for name in names:
            pool = attention.KVPool({0: (HKV, D, dtype)}, num_blocks, BS, args.device)
            for t in (pool.keys[0], pool.values[0]):
                t.normal_()
            backend = attention.create(name, pool, **({"batch_decode": args.device != "cpu"} if name == "sdpa"
                                                      else {}))
            meta = attention.build(layout, BS, args.device)
            backend.prepare(meta, layout)
            row[f"{name}_ms"] = 1e3 * timed(lambda: backend.forward(0, q, k, v, meta, D ** -0.5), args.device,
                                            args.iters)
        if step_name == "decode":
            kv_bytes = 2 * sum(s + n for n, s, _ in layout) * HKV * D * dtype.itemsize
            for name in names:
                row[f"{name}_gbps"] = kv_bytes / (row[f"{name}_ms"] / 1e3) / 1e9
        results["steps"][step_name] = row
        print(step_name, {key: round(val, 3) for key, val in row.items()})
    sys.path.insert(0, HERE)
    from _results import write

    lines = [f"One attention layer on {results['device']} ({args.dtype}, {results['shape']}), median of "
             f"{args.iters}: ms per step (KV write + attention), reference = SDPA on contiguous tensors.", "",
             "| step | reference ms | " + " | ".join(f"{n} ms" for n in names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for step_name, row in results["steps"].items():
        lines.append(f"| {step_name} | {row['reference_ms']:.3f} | "
                     + " | ".join(f"{row[f'{n}_ms']:.3f}" for n in names) + " |")
    write(f"attention_kernel_{args.device}", results, lines)


if __name__ == "__main__":
    main()
