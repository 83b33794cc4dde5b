"""What the Serve path costs one stream, and many: the same decode measured at the gang, in process, and over HTTP,
in one run.

    .venv/bin/python benchmarks/stream_path.py --model raytp-llama-0.5b

Batch 1 (``--tokens`` greedy tokens after a 2-token prompt, ignore_eos; each measurement ``--repeat`` times,
round-robin, medians):
  gang        a second TP=1 gang of the same config beside the app's, in the same Ray, driven directly, step by
              step (``raytp.bench.direct``: no scheduler, no Serve);
  http        one non-streaming ``/v1/completions`` request through the Serve app;
  http_stream the same request streamed (SSE): tokens / time from sending to the last event; the events are
              counted (one per token is what clients expect).
Concurrent (``--clients`` streams, ``--conc-tokens`` tokens each, 256-token prompts): output tok/s over HTTP
against the same requests through the engine in process (``LocalExecutor``, no Ray) with the same config.
The app runs the config's CPU defaults (``num_cpus_per_worker``, the reserved frontend core); ``--set k=v``
overrides a config field for every target (``num_cpus_per_worker=2`` gives the app's rank the in-process engine's
threads, the fair comparison of the Serve path itself). Results: benchmarks/results/<--output>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
PORT = 8131


def config(args, **more) -> dict:
    cfg = {"model": args.model, "tensor_parallel_size": 1, "device": "cpu", "max_model_len": 1024}
    for item in args.set:
        key, _, value = item.partition("=")
        cfg[key] = yaml.safe_load(value)
    return {**cfg, **more}


async def gang_once(executor, args, tag: str) -> float:
    """tok/s of the gang alone: one prefill step of the prompt, then a step per token."""
    from raytp.bench.direct import DirectBatch
    from raytp.messages import SamplingParams

    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    batch = DirectBatch(executor, [(5, 6)], params, block_size=executor.config.block_size, tag=tag)
    start = time.perf_counter()
    for _ in range(args.tokens):
        await batch.step()
    rate = args.tokens / (time.perf_counter() - start)
    await batch.release()
    return rate


async def http_one(http, args, stream: bool) -> tuple[float, int]:
    """(tok/s, SSE events with a token) of one request of ``args.tokens`` tokens."""
    body = {"model": args.model, "prompt": [5, 6], "max_tokens": args.tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}
    url = f"http://127.0.0.1:{PORT}/v1/completions"
    start = time.perf_counter()
    events = 0
    if stream:
        async with http.stream("POST", url, json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    events += bool(json.loads(line[6:])["choices"])
    else:
        r = await http.post(url, json=body)
        assert r.json()["usage"]["completion_tokens"] == args.tokens, r.text
    return args.tokens / (time.perf_counter() - start), events


def concurrent_requests(args) -> list[tuple[int, ...]]:
    rng = random.Random(0)
    return [tuple(rng.randrange(10, 400) for _ in range(256)) for _ in range(args.clients)]


async def http_concurrent(http, args) -> float:
    url = f"http://127.0.0.1:{PORT}/v1/completions"

    async def one(prompt):
        body = {"model": args.model, "prompt": list(prompt), "max_tokens": args.conc_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True}
        async with http.stream("POST", url, json=body) as r:
            async for _ in r.aiter_lines():
                pass

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in concurrent_requests(args)))
    return args.clients * args.conc_tokens / (time.perf_counter() - start)


async def engine_concurrent(args) -> float:
    """The same concurrent requests through the engine in this process (no Ray, no Serve)."""
    from transformers import AutoTokenizer

    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.gang.local import LocalExecutor
    from raytp.messages import SamplingParams

    cfg = resolve(config(args))
    executor = LocalExecutor(cfg)
    engine = make_engine(cfg, executor, AutoTokenizer.from_pretrained(cfg.model_path))
    await engine.start()
    params = SamplingParams(max_tokens=args.conc_tokens, temperature=0.0, ignore_eos=True)

    async def one(i, prompt):
        async for _ in engine.generate(f"c{i}", prompt, params):
            pass

    try:
        start = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(concurrent_requests(args))))
        return args.clients * args.conc_tokens / (time.perf_counter() - start)
    finally:
        engine.shutdown()


async def serve_measurements(args) -> dict:
    import httpx

    from raytp.bench.targets import _raytp_app
    from raytp.config import resolve
    from raytp.gang.executor import RayExecutor

    out = {"gang": [], "http": [], "http_stream": [], "stream_events": []}
    opts = {k: v for k, v in config(args).items() if k != "model"}
    with _raytp_app(args.model, opts, PORT):
        # a second gang of the same config beside the app's, driven directly; measured in turn with the app
        resolved = resolve(config(args, num_cpus_per_worker=opts.get("num_cpus_per_worker", os.cpu_count() or 1)))
        executor = RayExecutor(resolved)
        await executor.start()
        try:
            async with httpx.AsyncClient(timeout=600) as http:
                await http_one(http, args, False)  # warm-up
                await gang_once(executor, args, "w")
                for i in range(args.repeat):
                    out["gang"].append(await gang_once(executor, args, f"g{i}"))
                    out["http"].append((await http_one(http, args, False))[0])
                    rate, events = await http_one(http, args, True)
                    out["http_stream"].append(rate)
                    out["stream_events"].append(events)
                if args.clients:
                    out["http_concurrent"] = await http_concurrent(http, args)
        finally:
            executor.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="raytp-llama-0.5b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--conc-tokens", type=int, default=64)
    ap.add_argument("--set", action="append", default=[], help="a config field for every target, k=v")
    ap.add_argument("--output", default="stream_path", help="results name under benchmarks/results")
    args = ap.parse_args()
    import ray

    # logical CPUs for two gangs (the app's and the directly driven one), measured one at a time
    ray.init(num_cpus=4 * (os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    serve = asyncio.run(serve_measurements(args))
    ray.shutdown()
    engine = asyncio.run(engine_concurrent(args)) if args.clients else None
    gang = statistics.median(serve["gang"])
    http, stream = statistics.median(serve["http"]), statistics.median(serve["http_stream"])
    result = {"args": vars(args), "gang_tok_s": gang, "http_tok_s": http, "http_stream_tok_s": stream,
              "stream_events": serve["stream_events"], "runs": serve,
              "http_concurrent_tok_s": serve.get("http_concurrent"), "engine_concurrent_tok_s": engine}
    sys.path.insert(0, HERE)
    from _results import write

    lines = [f"`{args.model}` TP=1 on this CPU, batch 1, {args.tokens} tokens, medians of {args.repeat} "
             f"round-robin rounds (overrides: {args.set or 'none'}).", "",
             "| path | tok/s | × gang |", "| --- | --- | --- |",
             f"| gang, driven directly | {gang:.2f} | 1.00 |",
             f"| HTTP, not streamed | {http:.2f} | {http / gang:.2f} |",
             f"| HTTP, streamed (SSE events with a token: {serve['stream_events']}) | {stream:.2f} | "
             f"{stream / gang:.2f} |"]
    if engine:
        conc = serve["http_concurrent"]
        lines += ["", f"{args.clients} concurrent streams × {args.conc_tokens} tokens (256-token prompts): HTTP "
                  f"{conc:.1f} output tok/s, engine in process {engine:.1f} ({conc / engine:.2f}×)."]
    cmd = "`.venv/bin/python benchmarks/stream_path.py " + " ".join(sys.argv[1:]) + "`"
    write(args.output, result, lines + ["", cmd])


if __name__ == "__main__":
    main()
