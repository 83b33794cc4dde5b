"""Turn per-request results into the numbers ``vllm bench serve`` reports, under the same names:
``request_throughput``, ``output_throughput``, ``total_token_throughput``, ``request_goodput`` and, for each
of ``ttft``, ``tpot``, ``itl``, ``e2el``: ``mean_*_ms``, ``median_*_ms``, ``std_*_ms``, ``p{N}_*_ms``."""

from __future__ import annotations

import statistics

from raytp.bench.clients import RequestResult

LATENCIES = ("ttft", "tpot", "itl", "e2el")


def percentile(xs: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), 0 for no data."""
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` → SLOs in milliseconds, keyed by latency name."""
    slos = {}
    for spec in specs or []:
        name, _, value = spec.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, not {spec!r}")
        slos[name] = float(value)
    return slos


def samples_ms(results: list[RequestResult]) -> dict[str, list[float]]:
    """Each latency's samples in milliseconds over the successful requests (TPOT only where it is defined)."""
    ok = [r for r in results if r.ok]
    return {"ttft": [1000 * r.ttft_s for r in ok], "tpot": [1000 * r.tpot_s for r in ok if r.output_len > 1],
            "itl": [1000 * x for r in ok for x in r.itl_s], "e2el": [1000 * r.e2e_s for r in ok]}


def summarize(results: list[RequestResult], duration_s: float, percentiles: list[float],
              goodput_slos: dict[str, float] | None = None) -> dict:
    ok = [r for r in results if r.ok]
    samples = samples_ms(results)
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    m = {
        "duration": duration_s, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s, "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
    }
    for name in LATENCIES:
        ms = samples[name]
        m[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        m[f"median_{name}_ms"] = percentile(ms, 50)
        m[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else 0.0
        for p in percentiles:
            m[f"p{p:g}_{name}_ms"] = percentile(ms, p)
    if goodput_slos:
        good = sum(all(1000 * {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2el": r.e2e_s}[k] <= v
                       for k, v in goodput_slos.items()) for r in ok)
        m["request_goodput"] = good / duration_s
        m["goodput_slos_ms"] = goodput_slos
    return m
