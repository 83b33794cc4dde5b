"""What sending a step to the ranks costs: the executor's step channel (``raytp.gang.channel``, one Unix socket per
rank) against a Ray actor call per rank per step (``RAYTP_STEP_CHANNEL=0``), on a real gang, in one run.

    .venv/bin/python benchmarks/step_channel.py --model raytp-tiny-llama --tp 2

For each transport, alternately over ``--rounds`` fresh gangs: empty steps (no rows: every rank answers at once, so
the time is the transport's alone) and greedy decode steps of ``--rows`` rows of the model; per step, wall ms and
the driver's CPU ms (this process's CPU time: the engine's share of a small host). Medians over the rounds.
Results: benchmarks/results/step_channel.{json,md} (``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


async def measure(cfg, rows: int, steps: int) -> dict:
    from raytp.gang.executor import RayExecutor
    from raytp.messages import NewRequest, RowInput, SamplingParams, StepInput

    greedy = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    ex = RayExecutor(cfg)
    await ex.start()
    try:
        out = {"channel": ex._channel is not None}

        async def timed(make_step, n):
            for _ in range(5):  # warm-up
                await ex.step(make_step())
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                await ex.step(make_step())
            return (time.perf_counter() - wall) / n * 1e3, (time.process_time() - cpu) / n * 1e3

        out["empty_ms"], out["empty_cpu_ms"] = await timed(StepInput, steps)
        prompt = (5, 6, 7)
        blocks = -(-(len(prompt) + steps + 16) // cfg.block_size)
        new = tuple(NewRequest(f"r{i}", i, greedy, len(prompt), tuple(range(1 + i * blocks, 1 + (i + 1) * blocks)))
                    for i in range(rows))
        first = await ex.step(StepInput(new, tuple(RowInput(i, prompt, 0, True) for i in range(rows))))
        last, pos = list(first.tokens), len(prompt)

        def decode():
            nonlocal pos
            step = StepInput((), tuple(RowInput(i, (last[i],), pos, True) for i in range(rows)))
            pos += 1
            return step

        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            last = list((await ex.step(decode())).tokens)
        out["decode_ms"] = (time.perf_counter() - wall) / steps * 1e3
        out["decode_cpu_ms"] = (time.process_time() - cpu) / steps * 1e3
        return out
    finally:
        ex.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="raytp-tiny-llama")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", default="step_channel")
    args = p.parse_args()

    import ray

    from raytp.config import resolve

    cfg = resolve({"model": args.model, "tensor_parallel_size": args.tp, "device": "cpu", "dtype": args.dtype,
                   "num_cpus_per_worker": max(1, (os.cpu_count() or 2) // args.tp), "max_model_len": 512})
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict]] = {"channel": [], "actor calls": []}
    for _ in range(args.rounds):
        for name, env in (("channel", "1"), ("actor calls", "0")):
            os.environ["RAYTP_STEP_CHANNEL"] = env
            result = asyncio.run(measure(cfg, args.rows, args.steps))
            assert result.pop("channel") == (env == "1"), "the transport asked for was not the one used"
            runs[name].append(result)
            print(name, {k: round(v, 3) for k, v in result.items()}, flush=True)
    ray.shutdown()
    keys = ("empty_ms", "empty_cpu_ms", "decode_ms", "decode_cpu_ms")
    med = {name: {k: round(statistics.median(r[k] for r in rs), 3) for k in keys} for name, rs in runs.items()}
    md = [f"# Step transport ({args.model}, TP={args.tp}, {args.dtype}, {args.rows} decode row(s), "
          f"{args.steps} steps x {args.rounds} rounds)", "",
          f"Command: `.venv/bin/python benchmarks/step_channel.py {' '.join(sys.argv[1:])}`", "",
          "| transport | empty step ms | driver CPU ms | decode step ms | driver CPU ms |",
          "| --- | --- | --- | --- | --- |"]
    md += [f"| {name} | " + " | ".join(str(m[k]) for k in keys) + " |" for name, m in med.items()]
    ratio = med["actor calls"]["decode_ms"] / med["channel"]["decode_ms"]
    md += ["", f"Decode steps through the channel: {ratio:.2f}x the rate of actor calls."]
    _results.write(args.output, {"config": vars(args), "median": med, "runs": runs}, md)


if __name__ == "__main__":
    main()
