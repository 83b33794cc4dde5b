"""Async scheduling against one step at a time, on the same gang in one run.

    .venv/bin/python benchmarks/async_scheduling.py --model raytp-llama-0.5b --tp 1

One engine over one Ray gang (``RayExecutor``: the driver ⇄ rank round trip a Serve replica pays) or, with
``--local``, over the in-process executor. The workloads alternate between the two modes ``--repeat`` times
(the mode is read by the engine loop every iteration, so both run on the very same ranks and weights):
  batch 1     one request, a 2-token prompt, ``--tokens`` greedy tokens (ignore_eos): output tok/s;
  concurrent  ``--clients`` requests at once, 64-token prompts, ``--tokens`` tokens each: output tok/s.
Medians per mode, and their ratio. Results: benchmarks/results/async_scheduling.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


async def workload(engine, clients: int, tokens: int, prompt_len: int, tag: str) -> float:
    """Output tok/s of ``clients`` requests sent at once (random prompts of ``prompt_len`` tokens)."""
    from raytp.messages import SamplingParams

    rng = random.Random(0)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompts = [tuple(rng.randrange(10, len(engine.tokenizer)) for _ in range(prompt_len)) for _ in range(clients)]

    async def one(i: int) -> int:
        return sum([len(o.token_ids) async for o in engine.generate(f"{tag}-{i}", prompts[i], params)])

    start = time.perf_counter()
    total = sum(await asyncio.gather(*(one(i) for i in range(clients))))
    return total / (time.perf_counter() - start)


async def main(args) -> dict:
    from transformers import AutoTokenizer

    from raytp.config import resolve
    from raytp.engine.engine import make_engine

    cfg = resolve({"model": args.model, "tensor_parallel_size": args.tp, "device": "cpu", "max_model_len": 1024,
                   "max_num_seqs": max(args.clients, 1)})
    if args.local:
        from raytp.gang.local import LocalExecutor

        executor = LocalExecutor(cfg)
    else:
        import ray

        from raytp.gang.executor import RayExecutor

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        executor = RayExecutor(cfg)
    engine = make_engine(cfg, executor, AutoTokenizer.from_pretrained(cfg.model_path))
    await engine.start()
    rates: dict[str, dict[str, list[float]]] = {"batch1": {"sync": [], "async": []},
                                                "concurrent": {"sync": [], "async": []}}
    try:
        for r in range(args.repeat):
            for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
                engine.scheduling = dataclasses.replace(engine.scheduling, async_scheduling=mode == "async")
                rates["batch1"][mode].append(await workload(engine, 1, args.tokens, 2, f"b1-{mode}-{r}"))
                rates["concurrent"][mode].append(
                    await workload(engine, args.clients, args.tokens, 64, f"c-{mode}-{r}"))
                print(mode, {k: round(v[mode][-1], 2) for k, v in rates.items()}, flush=True)
    finally:
        engine.shutdown()
    return {k: {m: statistics.median(v) for m, v in modes.items()} | {"runs": modes} for k, modes in rates.items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="raytp-llama-0.5b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--local", action="store_true", help="the in-process executor (TP=1), no Ray")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    result = asyncio.run(main(args))
    from benchmarks._results import write

    where = "in process" if args.local else f"Ray gang, TP={args.tp}"
    lines = [f"# Async scheduling vs one step at a time ({args.model}, {where}, cpu, medians of {args.repeat})", "",
             "| workload | sync tok/s | async tok/s | async / sync |", "| --- | --- | --- | --- |"]
    for name, label in (("batch1", "batch 1"), ("concurrent", f"{args.clients} concurrent")):
        s, a = result[name]["sync"], result[name]["async"]
        lines.append(f"| {label}, {args.tokens} tokens | {s:.2f} | {a:.2f} | {a / s:.2f}x |")
    lines += ["", f"`.venv/bin/python benchmarks/async_scheduling.py --model {args.model} --tp {args.tp}"
              f"{' --local' if args.local else ''} --tokens {args.tokens} --clients {args.clients} "
              f"--repeat {args.repeat}`"]
    write("async_scheduling" + ("_local" if args.local else f"_tp{args.tp}"), {"args": vars(args), **result}, lines)
