"""What deterministic greedy answers cost on CPU, in one run: three in-process engines on one checkpoint,
alternated ``--repeat`` times, medians.

    .venv/bin/python benchmarks/determinism.py --model raytp-llama-0.5b

  default          the default config: prompt attention in fixed query tiles (``SdpaBackend.tiled_prefill``), so
                   a greedy answer does not depend on the prefix cache or on how its prompt was chunked;
  batch_invariant  ``batch_invariant: true``: also independent of the rest of the batch (one-row linears padded);
  flash_prompts    the default config with torch's SDPA (its flash kernel) for prompt rows, as before the tiles.

Workloads: batch 1 (a 2-token prompt, ``--tokens`` greedy tokens: output tok/s), ``--clients`` concurrent requests
(64-token prompts: output tok/s), and one ``--prompt``-token prompt's time to first token (no cached prefix).
Results: benchmarks/results/determinism.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from async_scheduling import workload  # noqa: E402

VARIANTS = ("default", "batch_invariant", "flash_prompts")


async def ttft(engine, prompt_len: int, tag: str) -> float:
    from raytp.messages import SamplingParams

    rng = random.Random(tag)
    prompt = tuple(rng.randrange(10, len(engine.tokenizer)) for _ in range(prompt_len))
    start = time.perf_counter()
    async for _ in engine.generate(tag, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)):
        break
    return time.perf_counter() - start


async def main(args) -> dict:
    from transformers import AutoTokenizer

    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.gang.local import LocalExecutor

    engines = {}
    for name in VARIANTS:
        cfg = resolve({"model": args.model, "tensor_parallel_size": 1, "device": "cpu", "max_model_len": 1024,
                       "max_num_seqs": max(args.clients, 1), "batch_invariant": name == "batch_invariant"})
        engine = make_engine(cfg, LocalExecutor(cfg), AutoTokenizer.from_pretrained(cfg.model_path))
        await engine.start()
        if name == "flash_prompts":
            engine.executor.runner.backend.tiled_prefill = False
        engines[name] = engine
    rates = {w: {v: [] for v in VARIANTS} for w in ("batch1", "concurrent", "ttft_s")}
    try:
        for r in range(args.repeat):
            for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                engine = engines[name]
                rates["batch1"][name].append(await workload(engine, 1, args.tokens, 2, f"b1-{r}"))
                rates["concurrent"][name].append(await workload(engine, args.clients, args.tokens, 64, f"c-{r}"))
                rates["ttft_s"][name].append(await ttft(engine, args.prompt, f"p-{r}"))
                print(name, {k: round(v[name][-1], 3) for k, v in rates.items()}, flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    return {k: {v: statistics.median(runs) for v, runs in by.items()} | {"runs": by} for k, by in rates.items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="raytp-llama-0.5b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    result = asyncio.run(main(args))
    from _results import write

    lines = [f"# Deterministic greedy answers: their cost ({args.model}, in process, TP=1, cpu, medians of "
             f"{args.repeat})", "",
             "| workload | default | batch_invariant | flash_prompts (before) | batch_invariant / default | "
             "default / flash_prompts |", "| --- | --- | --- | --- | --- | --- |"]
    for key, label in (("batch1", f"batch 1, {args.tokens} tokens, tok/s"),
                       ("concurrent", f"{args.clients} concurrent, tok/s"),
                       ("ttft_s", f"TTFT of a {args.prompt}-token prompt, s")):
        d, b, f = (result[key][v] for v in VARIANTS)
        lines.append(f"| {label} | {d:.3g} | {b:.3g} | {f:.3g} | {b / d:.2f}x | {d / f:.2f}x |")
    lines += ["", "Ratios are of the numbers as printed: for TTFT, above 1 is slower.", "",
              f"`.venv/bin/python benchmarks/determinism.py --model {args.model} --tokens {args.tokens} "
              f"--clients {args.clients} --prompt {args.prompt} --repeat {args.repeat}`"]
    write("determinism", {"args": vars(args), **result}, lines)
