"""A rank's decode step alone on the CPU and beside a process that takes a share of one core, as Serve's own
processes (proxy, replica, controller) take one from a served rank: what a little contention costs a gang whose
threads wait for each other at every parallel region.

    python benchmarks/contention.py --model raytp-llama-0.5b --busy 0,0.1,0.25

One rank (TP=1, bf16, ``compile_model``, on every core) loaded as a worker loads it (``LocalExecutor``: the steps'
thread loads the model); for each of ``--batches``, that many rows of 100-token prompts prefilled once, then
decode steps for ``--seconds``, per setting: none, then a process busy for ``busy`` of every 10 ms (a Python spin
loop), each setting in turn in one process. Reports each batch's decode step p50 (ms) and tok/s, and the slowdown
against the step alone. Results: benchmarks/results/contention.{json,md} (``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPIN = ("import sys, time\nduty = float(sys.argv[1])\nwhile True:\n    t = time.perf_counter()\n"
        "    while time.perf_counter() - t < duty * 0.01:\n        pass\n    time.sleep(0.01 * (1 - duty))\n")


async def steps_p50(executor, batch: int, seconds: float) -> float:
    """Median seconds of the decode steps of ``batch`` rows, run for ``seconds`` after their prompts."""
    from raytp.bench.direct import DirectBatch
    from raytp.messages import SamplingParams

    prompts = [tuple(range(10 + i, 110 + i)) for i in range(batch)]
    tokens = 1500  # each row's blocks are reserved up front: 16 rows fit the default KV budget
    rows = DirectBatch(executor, prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
                       tag=f"b{batch}_{time.monotonic_ns()}_")
    await rows.step()  # the prompts
    times, end = [], time.monotonic() + seconds
    while time.monotonic() < end and len(times) < tokens - 1:
        start = time.perf_counter()
        await rows.step()
        times.append(time.perf_counter() - start)
    await rows.release()
    return sorted(times)[len(times) // 2]


async def run(args) -> dict:
    from raytp import tiny_model
    from raytp.config import resolve
    from raytp.gang.local import LocalExecutor

    path = tiny_model.ensure(args.model) if args.model in tiny_model.PRESETS else args.model
    cfg = resolve({"model": path, "tensor_parallel_size": 1, "dtype": "bfloat16", "compile_model": True}, "cpu")
    executor = LocalExecutor(cfg)
    start = time.perf_counter()
    report = (await executor.start())[0]
    out = {"start_s": round(time.perf_counter() - start, 1), "decode_mode": report.decode_mode, "settings": {}}
    for busy in args.busy:  # alone first: every ratio is to it
        spinner = subprocess.Popen([sys.executable, "-c", SPIN, str(busy)]) if busy else None
        try:
            steps = {b: await steps_p50(executor, b, args.seconds) for b in args.batches}
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        out["settings"][str(busy)] = {f"b{b}_step_ms": round(s * 1e3, 1) for b, s in steps.items()}
        print(busy, out["settings"][str(busy)], flush=True)
    executor.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="raytp-llama-0.5b")
    p.add_argument("--busy", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.1, 0.25],
                   help="shares of one core the other process takes, comma-separated (alone is always measured first)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--output", default="contention")
    args = p.parse_args()
    args.busy = [0.0] + [b for b in args.busy if b]

    out = asyncio.run(run(args))
    alone = out["settings"]["0.0"]
    md = [f"{args.model}, TP=1 bf16 compiled, {os.cpu_count()} cores; decode step p50 (ms) beside a process busy for "
          f"a share of one core (ready after {out['start_s']} s, decode {out['decode_mode']})", "",
          "| other process | " + " | ".join(f"batch {b} step ms | tok/s | vs alone" for b in args.batches) + " |",
          "| --- | " + " | ".join("--- | --- | ---" for _ in args.batches) + " |"]
    for busy, steps in out["settings"].items():
        cells = []
        for b in args.batches:
            ms = steps[f"b{b}_step_ms"]
            cells.append(f"{ms} | {b * 1e3 / ms:.1f} | {alone[f'b{b}_step_ms'] / ms:.2f}x")
        md.append(f"| {float(busy):.0%} of a core | " + " | ".join(cells) + " |")
    _results.write(args.output, out, md)


if __name__ == "__main__":
    main()
