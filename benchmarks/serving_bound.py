"""The fastest any batching policy could serve benchmarks/serving.py's workload on this machine.

Whatever the scheduler, every prompt must be prefilled once and every output token decoded. This measures,
in-process with plain transformers (same model, dtype and threads as serving.py): the prefill time of each of
the workload's prompts (batch 1: on CPU prefill is compute-bound, so batching prompts does not make it cheaper,
and padding makes it dearer), and the decode tokens/s at the largest batch the schedulers use. The bound is

    T_min = sum(prefill) + output tokens / decode tok/s at full batch,     throughput_max = output tokens / T_min

and it is compared with the static policy's measured throughput in benchmarks/results/serving.json, to show
how far any continuous-batching policy can get above it here. Results: benchmarks/results/serving_bound.*
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script
from serving import requests  # noqa: E402 - the same seeded workload


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="raytp-llama-0.5b")
    ap.add_argument("--dtype", default=None, help="default: serving.py's (bfloat16 with native CPU bf16, else "
                    "float32)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, action="append", help="decode batch sizes to probe (default 8 and 16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from raytp import tiny_model
    from raytp.compat import dtype_kwarg
    from raytp.config import cpu_auto_dtype

    args.dtype = args.dtype or cpu_auto_dtype()  # the same for every target, as raytp's dtype: auto

    path = tiny_model.ensure(args.model) if args.model in tiny_model.PRESETS else args.model
    work = [(r.prompt, r.output_len) for r in requests(args.num_prompts, args.seed)]
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(getattr(torch, args.dtype))).eval()
    out_tokens = sum(n for _, n in work)
    with torch.inference_mode():
        model(torch.tensor([work[0][0]]))  # warm-up
        prefill_s = 0.0
        for prompt, _ in work:
            t = time.perf_counter()
            model(torch.tensor([prompt]), logits_to_keep=1)
            prefill_s += time.perf_counter() - t
        decode = {}
        for b in args.batch or [8, 16]:
            ids = torch.randint(10, 400, (b, 256))  # a typical context: prompt ~160 + half the output
            cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
            tok = torch.randint(10, 400, (b, 1))
            model(tok, past_key_values=cache, use_cache=True)
            t = time.perf_counter()
            for _ in range(8):
                model(tok, past_key_values=cache, use_cache=True)
            decode[b] = 8 * b / (time.perf_counter() - t)
    best_b = max(decode, key=decode.get)
    t_min = prefill_s + out_tokens / decode[best_b]
    bound = out_tokens / t_min
    result = {"model": args.model, "dtype": args.dtype, "num_prompts": args.num_prompts, "output_tokens": out_tokens,
              "prompt_tokens": sum(len(p) for p, _ in work), "prefill_s": prefill_s,
              "decode_tok_s_by_batch": decode, "t_min_s": t_min, "throughput_bound_tok_s": bound}
    serving = os.path.join(_results.RESULTS, "serving.json")
    lines = [f"# Throughput bound for the serving workload: {args.model} {args.dtype}, {os.cpu_count()} CPUs", "",
             f"- prompt tokens {result['prompt_tokens']}, output tokens {out_tokens}",
             f"- prefill, all prompts at batch 1: {prefill_s:.1f} s",
             "- decode tok/s by batch: " + ", ".join(f"b={b}: {v:.1f}" for b, v in decode.items()),
             f"- T_min = {prefill_s:.1f} + {out_tokens} / {decode[best_b]:.1f} = {t_min:.1f} s "
             f"→ at most **{bound:.1f} output tok/s** for any scheduler"]
    if os.path.exists(serving):
        with open(serving) as f:
            runs = json.load(f)["runs"]
        for tp in (1, 2):
            if f"tp{tp}_static" in runs:
                static = runs[f"tp{tp}_static"]["output_throughput"]
                result[f"bound_over_static_tp{tp}"] = bound / static
                lines.append(f"- TP={tp}: static measured {static:.1f} tok/s → bound / static = {bound / static:.2f}")
    _results.write("serving_bound", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
