"""Where the CPU goes while clients stream from a Serve app: CPU seconds per process (ranks, ingress, server
replica, proxy, controller, ...) over a fixed window of streaming load, and the output tokens/s, in one run.

    .venv/bin/python benchmarks/serve_cpu.py --model raytp-tiny-llama --tp 2 --clients 16 --seconds 30

The app is raytp's default config for ``--model`` / ``--tp`` on CPU (``--set k=v`` overrides a field), served on
127.0.0.1:``--port``; ``--clients`` httpx clients (one thread, asyncio) stream 64-token completions of ~80-token
prompts in a loop. Serve's environment variables (e.g. ``RAY_SERVE_THROUGHPUT_OPTIMIZED``) apply when set in this
process's environment: Ray is started from here. ``--alternate k=v1,v2`` measures one app per value in turn
(``--rounds`` times); ``--alternate endpoint=proxy,direct`` one app with Serve's direct ingress on, loaded through
Serve's proxy and on the replica's own HTTP port (30000) in turn. Results: benchmarks/results/<--output>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def cpu_seconds() -> dict[int, tuple[str, float]]:
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            times = p.cpu_times()
            out[p.info["pid"]] = (" ".join(p.info["cmdline"] or [p.info["name"]])[:60], times.user + times.system)
        except psutil.Error:
            pass
    return out


async def load(url: str, model: str, clients: int, seconds: float):
    import httpx

    tokens = [0]

    async def client(http, i: int, stop: float) -> None:
        body = {"model": model, "prompt": f"client {i} " * 40, "max_tokens": 64, "ignore_eos": True, "stream": True}
        while time.monotonic() < stop:
            async with http.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        tokens[0] += 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as http:
        await client(http, -1, time.monotonic() + 1)  # warm-up
        tokens[0] = 0
        before, start = cpu_seconds(), time.monotonic()
        await asyncio.gather(*(client(http, i, start + seconds) for i in range(clients)))
        elapsed, after = time.monotonic() - start, cpu_seconds()
    return tokens[0] / elapsed, elapsed, before, after


DIRECT_PORT = 30000  # Serve's first direct-ingress port (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT): one replica


@contextlib.contextmanager
def app(args, opts: dict):
    """Ray and the app with ``opts`` for the block."""
    import ray

    from raytp.bench.targets import _raytp_app

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with _raytp_app(args.model, opts, args.port):
            yield
    finally:
        ray.shutdown()


def measure_load(args, url: str) -> dict:
    """The load against ``url`` once: output tok/s, the Serve path's CPU ms per token, CPU s per process."""
    rate, elapsed, before, after = asyncio.run(load(url, args.model, args.clients, args.seconds))
    me = os.getpid()
    per = collections.defaultdict(float)
    for pid, (name, t) in after.items():
        if pid in before and t - before[pid][1] > 0.05:
            per["this script (clients)" if pid == me else name.strip()] += t - before[pid][1]
    serve_path = sum(v for k, v in per.items() if any(s in k for s in ("OpenAIIngress", "LLMServer", "ProxyActor")))
    return {"tok_s": rate, "seconds": elapsed, "serve_path_s": serve_path,
            "serve_path_ms_per_token": serve_path / (rate * elapsed) * 1e3, "cpu_s": dict(per)}


def measure(args, opts: dict) -> dict:
    with app(args, opts):
        return measure_load(args, f"http://127.0.0.1:{args.port}")


def endpoints(args, opts: dict, values: list[str]) -> dict:
    """``--alternate endpoint=proxy,direct``: one app with Serve's direct ingress on (the ingress replica also
    serves HTTP on its own port), loaded through Serve's proxy and on the replica's port in turn."""
    from raytp.bench.targets import wait_healthy

    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"  # before Ray starts: its processes inherit it
    urls = {"proxy": f"http://127.0.0.1:{args.port}", "direct": f"http://127.0.0.1:{DIRECT_PORT}"}
    runs = {v: [] for v in values}
    with app(args, opts):
        # the replica's own server starts with the replica; the proxy answered already
        wait_healthy(urls["direct"], 120, f"the replica's own port {DIRECT_PORT}")
        for _ in range(args.rounds):
            for v in values:
                runs[v].append(measure_load(args, urls[v]))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="raytp-tiny-llama")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--port", type=int, default=8151)
    ap.add_argument("--set", action="append", default=[], help="a config field, k=v")
    ap.add_argument("--alternate", default=None, help="k=v1,v2,...: one app per value in turn, --rounds times; "
                    "ratios to the first value. endpoint=proxy,direct: one app with Serve's direct ingress, loaded "
                    "through the proxy and on the replica's own port in turn")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output", default="serve_cpu")
    args = ap.parse_args()
    import yaml

    opts = {"tensor_parallel_size": args.tp, "device": "cpu",
            **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}}
    env = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    command = "`" + " ".join([f"{k}={v}" for k, v in env.items()] + [".venv/bin/python", "benchmarks/serve_cpu.py"]
                             + sys.argv[1:]) + "`"
    from _results import write

    if args.alternate:
        key, _, values = args.alternate.partition("=")
        values = values.split(",")
        if key == "endpoint":
            runs = endpoints(args, opts, values)
        else:
            runs = {v: [] for v in values}
            for _ in range(args.rounds):
                for v in values:
                    runs[v].append(measure(args, {**opts, key: yaml.safe_load(v)}))
        env = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}  # endpoint= sets one
        med = {v: statistics.median(r["tok_s"] for r in rs) for v, rs in runs.items()}
        lines = [f"# {key} alternated under {args.clients} streaming clients ({args.model}, TP={args.tp}, cpu, "
                 f"{args.rounds} rounds of {args.seconds:.0f} s each; Serve env: {env or 'none'}; overrides: "
                 f"{args.set or 'none'})", "",
                 f"| {key} | output tok/s per round | median | × {values[0]} | Serve path CPU ms per token |",
                 "| --- | --- | --- | --- | --- |"]
        for v, rs in runs.items():
            rates = ", ".join(f"{r['tok_s']:.1f}" for r in rs)
            costs = ", ".join(f"{r['serve_path_ms_per_token']:.2f}" for r in rs)
            lines.append(f"| {v} | {rates} | {med[v]:.1f} | {med[v] / med[values[0]]:.2f} | {costs} |")
        lines += ["", command]
        write(args.output, {"args": vars(args), "serve_env": env, "runs": runs, "median_tok_s": med}, lines)
        return
    r = measure(args, opts)
    lines = [f"# CPU per process under {args.clients} streaming clients ({args.model}, TP={args.tp}, cpu, "
             f"{r['seconds']:.0f} s; Serve env: {env or 'none'}; overrides: {args.set or 'none'})", "",
             f"Output {r['tok_s']:.1f} tok/s; proxy + ingress + server replica: {r['serve_path_s']:.2f} CPU s = "
             f"{r['serve_path_ms_per_token']:.2f} ms per token; {os.cpu_count()} cores = "
             f"{os.cpu_count() * r['seconds']:.0f} CPU s available.", "", "| CPU s | process |", "| --- | --- |"]
    lines += [f"| {v:.2f} | {k} |" for k, v in sorted(r["cpu_s"].items(), key=lambda kv: -kv[1])]
    lines += ["", command]
    write(args.output, {"args": vars(args), "serve_env": env, **r}, lines)


if __name__ == "__main__":
    main()
