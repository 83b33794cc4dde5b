"""One rank's model step, plain eager against each variant, on this machine, in one run: torch's plain linears vs
prepacked ones (``raytp.gang.linears``, the ``prepack_weights`` default on CPU; packed for the kernel a rank picks
here, ``cpu_linear_kernel: auto``: raytp's or oneDNN's), vs the step compiled
(``raytp.gang.compiled``) with each set of Inductor options, and (``decode_kernel``, prepacked both ways) decode
rows attended per row vs by the compiled CPU decode kernel (``raytp.gang.attention.cpu_decode``, the default), and
(``compiled_vs_prepacked``) the compiled step with CPU's compile options against the eager prepacked step.
Decode tok/s at ``--batches`` (1 and 8 by default; one token per row, contexts of ``--context`` tokens) and a
prefill chunk, through a rank's ``ModelRunner`` forward (paged KV, the sdpa backend), plus the compile seconds.

    python benchmarks/model_step.py --model raytp-llama-0.5b --dtype bfloat16
    python benchmarks/model_step.py --options decode_kernel --threads 1 --context 200 --batches 1,16
    python benchmarks/model_step.py --options compiled_vs_prepacked --threads 1 --context 200 --batches 1,16 --starts 2

Each variant runs in its own process, over an Inductor cache of its own, empty at first (``--starts 2``: the same
process again, as a restart finds the cache), and times plain eager steps of the same model there too, interleaved
with the variant's, so every ratio is within one process and one minute. Results:
benchmarks/results/model_step.{json,md} (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

OPTION_SETS = {  # variant -> Inductor options (None: eager, with prepacked linears; "decode_kernel": see below)
    "prepacked": None,
    # prepacked linears both ways; decode rows per row (two float32 einsums each) vs the compiled CPU decode kernel
    "decode_kernel": "decode_kernel",
    # the compiled step as a rank runs it (CPU's compile options; decode steps through the graph, attention inline;
    # prompt chunks eager) vs the eager prepacked step, the default, in one process
    "compiled_vs_prepacked": "compiled_vs_prepacked",
    "default": {},
    "freezing": {"freezing": True},
    "freezing+cpp_wrapper": {"freezing": True, "cpp_wrapper": True},
    "max_autotune": {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"},
}


def measure(args, options: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from raytp import tiny_model
    from raytp.compat import dtype_kwarg
    from raytp.gang import attention
    from raytp.gang.model_runner import ModelRunner

    torch.set_num_threads(args.threads)
    path = tiny_model.ensure(args.model) if args.model in tiny_model.PRESETS else args.model
    model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(getattr(torch, args.dtype))).eval()
    bs = 16
    width = -(-(args.context + args.steps + args.chunk) // bs)
    kernel = options == "decode_kernel"
    against_packed = options == "compiled_vs_prepacked"
    if against_packed:
        from raytp.platforms import get

        options = get("cpu").compile_options(False, True)
    from raytp.gang.cpu_linear import kernel_for
    from raytp.gang.linears import prepack_linears

    linear_kernel = kernel_for(getattr(torch, args.dtype), "auto")  # a rank's choice here (cpu_linear_kernel: auto)
    if kernel or against_packed:  # (compiled: as a rank loads it, prepacked; the graph calls them by index)
        prepack_linears(model, kernel=linear_kernel)
    runner = ModelRunner(model, "cpu", 0, 1, block_size=bs, kv_cache_bytes=2 << 30, max_batch=max(args.batches),
                         max_model_len=width * bs, compile_options=None if kernel else options)
    variant, compile_s = None, 0.0
    if kernel:  # the runner's backend has the kernel (the CPU default); the baseline attends per row
        variant, compile_s = runner.backend, runner.backend.compile_s
        per_row = attention.create("sdpa", runner.pool, tiled_prefill=True)
    elif options is None:  # a second copy of the model, its linears prepacked, over the same paged KV pool
        packed = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(getattr(torch, args.dtype))).eval()
        prepack_linears(packed, kernel=linear_kernel)
        plain = runner.model
    else:
        compile_s = runner.compiled.warm_up_s
        variant, runner.compiled = runner.compiled, None  # against_packed: the eager baseline is the same model

    def tables(batch):  # each row its own blocks, after the null block
        return [tuple(range(1 + r * width, 1 + (r + 1) * width)) for r in range(batch)]

    def step(layout, use_variant):
        if kernel:
            runner.backend = variant if use_variant else per_row
        elif options is None:
            runner.model = packed if use_variant else plain
        else:
            runner.compiled = variant if use_variant else None
        with torch.inference_mode():  # as a rank's steps: inference tensors
            meta = attention.build(layout, bs, "cpu")
            ids = torch.randint(10, 400, (1, meta.num_tokens))
            if runner.compiled is not None and runner.compiled.decode_only and meta.num_tokens == len(layout):
                runner.compiled.decode(runner.backend, meta, ids)  # as ModelRunner.step routes decode steps
                return
            runner.backend.prepare(meta, layout)
            ends = torch.cumsum(torch.tensor([n for n, _, _ in layout]), 0) - 1
            runner._forward(meta, ids, ends)

    def decode_rate(batch, use_variant):
        t = tables(batch)
        start = time.perf_counter()
        for s in range(args.steps):
            step([(1, args.context + s, t[r]) for r in range(batch)], use_variant)
        return batch * args.steps / (time.perf_counter() - start)

    def chunk_s(use_variant):
        start = time.perf_counter()
        step([(args.chunk, args.context, tables(1)[0])], use_variant)
        return time.perf_counter() - start

    rows = max(args.batches)
    for r in range(rows):  # every row's context written once (prefill), eagerly
        step([(args.context, 0, tables(rows)[r])], False)
    out = {"compile_s": round(compile_s, 1), "linear_kernel": linear_kernel}
    chunk_s(True)  # the variant's first prefill-sized call (oneDNN creates a primitive per new shape)
    for mode in (False, True, False, True):  # interleaved: drift hits both alike
        key = "variant" if mode else "eager"
        for batch in args.batches:
            out.setdefault(f"{key}_b{batch}_tok_s", []).append(decode_rate(batch, mode))
        out.setdefault(f"{key}_chunk{args.chunk}_s", []).append(chunk_s(mode))
    result = {k: (round(max(v), 2) if "tok_s" in k else round(min(v), 3)) if isinstance(v, list) else v
              for k, v in out.items()}
    for batch in args.batches:
        result[f"b{batch}_ratio"] = round(result[f"variant_b{batch}_tok_s"] / result[f"eager_b{batch}_tok_s"], 2)
    result["chunk_ratio"] = round(result[f"eager_chunk{args.chunk}_s"] / result[f"variant_chunk{args.chunk}_s"], 2)
    if kernel:
        from raytp.gang.attention.cpu_decode import PagedDecode

        result["recompiles"] = PagedDecode.shared().recompiles
    else:
        result["recompiles"] = variant.compiles - variant.warm_up_compiles if variant is not None else None
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="raytp-llama-0.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8],
                   help="decode batch sizes, comma-separated")
    p.add_argument("--options", default=",".join(OPTION_SETS), help="option sets to compare, comma-separated")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one option set in this process
    p.add_argument("--starts", type=int, default=1,
                   help="run each variant's process this many times over one Inductor cache, empty at the first: "
                        "compile_s of a restart, the cache warm")
    p.add_argument("--output", default="model_step")
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args, OPTION_SETS[args.one])))
        return
    rows = {}
    for variant in args.options.split(","):
        cmd = [sys.executable, __file__, "--one", variant, "--model", args.model, "--dtype", args.dtype,
               *(f"--{k}={getattr(args, k)}" for k in ("threads", "context", "steps", "chunk")),
               "--batches=" + ",".join(map(str, args.batches))]
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:  # every variant starts from an empty cache
            for start in range(1, args.starts + 1):
                name = variant if start == 1 else f"{variant} (start {start})"
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
                if proc.returncode:
                    rows[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
                else:
                    rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(name, rows[name], flush=True)
    meta = {k: getattr(args, k) for k in ("model", "dtype", "threads", "context", "steps", "chunk", "batches",
                                          "starts")}
    cols = ["compile_s"]
    for b in args.batches:
        cols += [f"eager_b{b}_tok_s", f"variant_b{b}_tok_s", f"b{b}_ratio"]
    cols += ["chunk_ratio", "recompiles"]
    md = ["| variant | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    md += [f"| {n} | " + " | ".join(str(r.get(c, r.get("error", ""))) for c in cols) + " |" for n, r in rows.items()]
    _results.write(args.output, {"config": meta, "results": rows}, md)


if __name__ == "__main__":
    main()
