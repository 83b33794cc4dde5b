"""Prefix-aware routing against Serve's power of two choices, two replicas, multi-turn chats, in one run.

    .venv/bin/python benchmarks/prefix_routing.py --model raytp-llama-0.5b

For each mode (``prefix_routing`` false, then true) the app runs ``--replicas`` replicas of TP=1 (``--cpus-per-replica``
in each one's bundle).
``--conversations`` chats, each with its own long system prompt (``--system-words`` random words), run
``--turns`` turns each (the history grows by the answer and a short new question), ``--concurrency`` chats at a
time; greedy, ``--max-tokens`` per answer. Reported: time to first token (p50, mean) of the turns after the first
(those that could reuse their chat's cached prefix), the whole run's seconds, and the prompt tokens the replicas'
prefix caches served (summed over replicas from their /health). Results: benchmarks/results/prefix_routing.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
PORT = 8133
URL = f"http://127.0.0.1:{PORT}"
WORDS = "the model serves tokens across ranks while replicas cache prompt prefixes for every turn".split()


def chat(args, rng: random.Random, index: int) -> list[float]:
    """One conversation's turns; returns the TTFT (s) of each turn."""
    import requests

    system = " ".join(rng.choice(WORDS) for _ in range(args.system_words))
    history = [{"role": "system", "content": f"Chat {index}. {system}"}, {"role": "user", "content": "Begin."}]
    ttfts = []
    for turn in range(args.turns):
        body = {"model": args.model, "messages": history, "max_tokens": args.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        start, first, text = time.perf_counter(), None, []
        with requests.post(URL + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
            assert r.status_code == 200, r.text
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"]
                    if delta and delta[0]["delta"].get("content"):
                        first = first or time.perf_counter()
                        text.append(delta[0]["delta"]["content"])
        ttfts.append((first or time.perf_counter()) - start)
        history += [{"role": "assistant", "content": "".join(text)}, {"role": "user", "content": f"And {turn}?"}]
    return ttfts


def hit_tokens(replicas: int) -> int:
    import requests

    seen, deadline = {}, time.monotonic() + 60
    while len(seen) < replicas and time.monotonic() < deadline:
        health = requests.get(URL + "/health", timeout=30).json()
        seen[health["replica_id"]] = health["kv_cache"]["prefix_cache_hit_tokens"]
    return sum(seen.values())


def measure(args, routing: bool) -> dict:
    from ray import serve

    from raytp.serve.app import bind_app

    cfg = {"model": args.model, "tensor_parallel_size": 1, "num_cpus_per_worker": args.cpus_per_replica,
           "device": "cpu", "dtype": args.dtype, "prefix_routing": routing}
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(bind_app(cfg, server_options={"num_replicas": args.replicas}), name="raytp-routing", route_prefix="/")
    try:
        rng = random.Random(0)
        seeds = [random.Random(rng.random()) for _ in range(args.conversations)]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            per_chat = list(pool.map(lambda i: chat(args, seeds[i], i), range(args.conversations)))
        took = time.perf_counter() - start
        later = [t for ttfts in per_chat for t in ttfts[1:]]
        return {"seconds": round(took, 1), "ttft_p50_s": round(statistics.median(later), 3),
                "ttft_mean_s": round(statistics.mean(later), 3), "prefix_hit_tokens": hit_tokens(args.replicas)}
    finally:
        serve.delete("raytp-routing")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="raytp-llama-0.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--system-words", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = {}
    for name, routing in (("power_of_two", False), ("prefix", True)):
        rows[name] = measure(args, routing)
        print(name, rows[name], flush=True)
    ray.shutdown()
    cmd = "python benchmarks/prefix_routing.py" + "".join(f" {a}" for a in sys.argv[1:])
    md = [f"# Prefix routing vs power of two choices ({args.model}, {args.replicas} replicas of TP=1, "
          f"{args.conversations} chats x {args.turns} turns, {args.concurrency} at a time)", "",
          f"Command: `{cmd}`", "",
          "| routing | run s | TTFT p50 s (turns 2+) | TTFT mean s | prompt tokens from prefix caches |",
          "| --- | --- | --- | --- | --- |"]
    md += [f"| {n} | {r['seconds']} | {r['ttft_p50_s']} | {r['ttft_mean_s']} | {r['prefix_hit_tokens']} |"
           for n, r in rows.items()]
    _results.write("prefix_routing", {"config": vars(args), "results": rows}, md)


if __name__ == "__main__":
    main()
