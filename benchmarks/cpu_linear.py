"""raytp's CPU bf16 linear (``raytp.gang.cpu_linear``) against oneDNN's matmul over its prepacked weights (the other
``cpu_linear_kernel``) and torch's plain ``F.linear``, on one rank's linears of a model (its shapes at
``--tp``), one pass over all of them per timing, at each row count of ``--rows``, in one process; plus the read
bandwidth of a plain ``sum`` over as many bytes (what streaming the weights could reach).

    python benchmarks/cpu_linear.py --model raytp-llama-0.5b --tp 1 --threads 1
    python benchmarks/cpu_linear.py --model raytp-llama-0.5b --tp 2 --threads 1

Results: benchmarks/results/cpu_linear.{json,md} (``--output``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shapes(model: str, tp: int) -> list[tuple[int, int]]:
    """(out, in) of one rank's linears, every layer (Llama-shaped: q, k, v, o, gate, up, down) and the head."""
    from transformers import AutoConfig

    from raytp.config import resolve

    cfg = AutoConfig.from_pretrained(resolve({"model": model, "device": "cpu"}).model_path)
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    layer = [(h // tp, h), (kv // tp, h), (kv // tp, h), (h, h // tp), (i // tp, h), (i // tp, h), (h, i // tp)]
    return layer * cfg.num_hidden_layers + [(cfg.vocab_size, h // tp)]


def best_of(fn, repeats: int, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="raytp-llama-0.5b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=lambda s: [int(r) for r in s.split(",")], default=[1, 2, 4, 8, 16, 32, 128])
    p.add_argument("--output", default="cpu_linear")
    args = p.parse_args()

    import torch

    from raytp.gang import cpu_linear

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dims = shapes(args.model, args.tp)
    weights = [torch.randn(n, k, dtype=torch.bfloat16) for n, k in dims]
    nbytes = sum(w.numel() * 2 for w in weights)
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    ours = [cpu_linear.pack(w) for w in weights]
    flat = torch.randn(nbytes // 2).to(torch.bfloat16)
    rows = {}
    with torch.inference_mode():
        read = best_of(flat.sum, 5)
        for m in args.rows:
            xs = [torch.randn(m, k, dtype=torch.bfloat16) for _, k in dims]
            for x, w, q in zip(xs, weights, ours):  # same products, or the timing means nothing
                want = torch.nn.functional.linear(x.float(), w.float())
                got = cpu_linear.linear(x, q, w.shape[0], None).float()
                assert (got - want).abs().max() <= 1e-2 * want.abs().max() + 1e-2, "raytp's product is wrong"
            repeats = max(1, 8 // m)
            t_onednn = best_of(lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                                        for x, w in zip(xs, onednn)], repeats)
            t_plain = best_of(lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, weights)], repeats)
            t_ours = best_of(lambda: [cpu_linear.linear(x, q, w.shape[0], None) for x, q, w in zip(xs, ours, weights)],
                             repeats)
            rows[m] = {"onednn_ms": round(t_onednn * 1e3, 2), "plain_ms": round(t_plain * 1e3, 2),
                       "raytp_ms": round(t_ours * 1e3, 2), "raytp_gb_s": round(nbytes / t_ours / 1e9, 1),
                       "onednn_gb_s": round(nbytes / t_onednn / 1e9, 1),
                       "raytp_vs_onednn": round(t_onednn / t_ours, 2), "raytp_vs_plain": round(t_plain / t_ours, 2)}
            print(m, rows[m], flush=True)
    meta = {"model": args.model, "tp": args.tp, "threads": args.threads, "weight_bytes": nbytes,
            "sum_read_gb_s": round(nbytes / read / 1e9, 1), "cpu": torch.backends.cpu.get_cpu_capability()}
    md = [f"{args.model}, one rank's linears at TP={args.tp} ({nbytes / 1e6:.0f} MB of bf16), {args.threads} "
          f"thread(s); a plain `sum` over as many bytes reads {meta['sum_read_gb_s']} GB/s", "",
          "| rows | oneDNN ms | F.linear ms | raytp ms | raytp GB/s | oneDNN GB/s | raytp vs oneDNN "
          "| raytp vs F.linear |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    md += [f"| {m} | {r['onednn_ms']} | {r['plain_ms']} | {r['raytp_ms']} | {r['raytp_gb_s']} | {r['onednn_gb_s']} | "
           f"{r['raytp_vs_onednn']}x | {r['raytp_vs_plain']}x |" for m, r in rows.items()]
    _results.write(args.output, {"config": meta, "results": rows}, md)


if __name__ == "__main__":
    main()
