"""raytp bench's pieces without a server: workload, metrics, targets, roofline arithmetic, report."""

import math
import statistics

import pytest

from raytp.bench import metrics, report, roofline, targets, workload
from raytp.bench.clients import RequestResult


def test_random_workload_is_seeded_and_in_range():
    a = workload.random_requests(50, 100, 20, 0.5, 300, seed=3)
    assert a == workload.random_requests(50, 100, 20, 0.5, 300, seed=3)
    assert a != workload.random_requests(50, 100, 20, 0.5, 300, seed=4)
    assert all(50 <= len(r.prompt) <= 150 and r.prompt_len == len(r.prompt) for r in a)
    assert all(10 <= t < 300 for r in a for t in r.prompt) and all(10 <= r.output_len <= 30 for r in a)
    assert {len(r.prompt) for r in workload.random_requests(5, 64, 8, 0.0, 300, 0)} == {64}


def test_poisson_arrivals_have_the_asked_rate():
    delays = workload.send_delays(4000, 20.0, seed=1)
    gaps = [b - a for a, b in zip(delays, delays[1:])]
    assert delays == sorted(delays) and delays[0] == 0.0
    assert statistics.fmean(gaps) == pytest.approx(1 / 20.0, rel=0.05)
    assert workload.send_delays(3, float("inf"), 0) == [0.0, 0.0, 0.0]


def test_jsonl_workload(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "hello there", "output_len": 7}\n\n{"prompt": [11, 12, 13]}\n')
    reqs = workload.jsonl_requests(p, 5, 9, seed=0)
    assert len(reqs) == 5
    got = {(str(r.prompt), r.output_len, r.prompt_len) for r in reqs}
    assert got == {("hello there", 7, None), ("[11, 12, 13]", 9, 3)}


def test_percentile_interpolates_like_numpy():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert metrics.percentile(xs, 50) == 2.5 and metrics.percentile(xs, 0) == 1.0 and metrics.percentile(xs, 100) == 4.0
    assert metrics.percentile(xs, 90) == pytest.approx(3.7) and metrics.percentile([], 99) == 0.0


def test_summarize_uses_vllm_names_and_arithmetic():
    results = [
        RequestResult(True, 10, 5, ttft_s=0.1, e2e_s=0.5, itl_s=[0.1] * 4),   # tpot 0.1
        RequestResult(True, 20, 3, ttft_s=0.3, e2e_s=0.7, itl_s=[0.2, 0.2]),  # tpot 0.2
        RequestResult(False, error="HTTP 429"),
    ]
    m = metrics.summarize(results, 2.0, [50, 90, 99], metrics.parse_goodput(["ttft:200", "tpot:150"]))
    assert (m["completed"], m["failed"], m["errors"]) == (2, 1, ["HTTP 429"])
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 8)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 4.0 and m["total_token_throughput"] == 19.0
    assert m["mean_ttft_ms"] == pytest.approx(200) and m["median_tpot_ms"] == pytest.approx(150)
    assert m["mean_itl_ms"] == pytest.approx(1000 * 0.8 / 6) and m["p99_e2el_ms"] == pytest.approx(698)
    assert m["request_goodput"] == 0.5  # only the first meets both SLOs
    for name in metrics.LATENCIES:
        assert {f"{s}_{name}_ms" for s in ("mean", "median", "std", "p50", "p90", "p99")} <= set(m)
    with pytest.raises(ValueError):
        metrics.parse_goodput(["latency:5"])


def test_compare_targets_parse():
    assert targets.parse("a=http://h:1") == targets.Target("a", "url", url="http://h:1")
    t = targets.parse("tp2=raytp:tensor_parallel_size=2,dtype=bfloat16,low_bit=null")
    assert t.kind == "raytp" and dict(t.options) == {"tensor_parallel_size": 2, "dtype": "bfloat16", "low_bit": None}
    assert targets.parse("hf=transformers").kind == "transformers"
    assert targets.parse("tfs=transformers-serve:dtype=bfloat16").kind == "transformers-serve"
    for bad in ("nourl", "x=ftp://h", "x=raytp:tp", "=raytp"):
        with pytest.raises(ValueError):
            targets.parse(bad)


def test_roofline_arithmetic_and_measured_inputs(tiny_model_path):
    weights = roofline.weight_bytes(tiny_model_path)
    assert weights > 100_000  # the tiny Llama's safetensors
    bw = roofline.copy_bandwidth(threads=1, size_mb=64, repeats=2)
    assert 1e8 < bw < 1e13  # a real copy speed, bytes/s
    r = RequestResult(True, 16, 33, ttft_s=0.5, e2e_s=2.1)
    assert roofline.decode_tok_s(r) == pytest.approx(32 / 1.6)  # 32 tokens after the first, in 1.6 s
    # reading every weight once per token at the measured bandwidth is the roofline: 1.0; half that speed: 0.5
    assert math.isclose(roofline.efficiency(bw / weights, weights, bw), 1.0)
    assert math.isclose(roofline.efficiency(bw / weights / 2, weights, bw), 0.5)


def test_markdown_report_has_a_row_per_target_and_ratios():
    from raytp.bench.main import _ratios

    run = {k: 2.0 for k, _ in report.KEY_METRICS} | {"max_concurrency": 4, "completed": 3, "failed": 0}
    targets_ = {"a": {"runs": [run]}, "b": {"runs": [run | {"output_throughput": 6.0}]}}
    ratios = _ratios(targets_)
    assert ratios["b"]["4"]["output_throughput"] == 3.0 and ratios["b"]["4"]["median_ttft_ms"] == 1.0
    md = report.markdown({"config": {"model": "m", "num_prompts": 3, "request_rate": "inf"}, "targets": targets_,
                          "ratios": ratios})
    assert "| a | 4 | 3 | 0 |" in md and "| b | 4 | 3 | 0 | 6.00 |" in md and "Ratios to `a`" in md
    assert "3.00" in md.split("Ratios to `a`")[1]


def test_engine_target_runs_the_requests_in_process(tiny_model_path):
    """``NAME=engine:...``: raytp's engine in this process serves the bench's requests (token-id prompts, exact
    output lengths with ignore_eos), concurrently, with the times the metrics need."""
    import asyncio

    from raytp.bench.workload import BenchRequest

    target = targets.parse("eng=engine:device=cpu,dtype=float32,max_model_len=256")
    requests = [BenchRequest([10 + i, 20, 30 + i], output_len=4 + i, prompt_len=3) for i in range(3)]

    async def go():
        async with targets.open_target(target, model="raytp-tiny-llama", ignore_eos=True, api_key=None,
                                       port=0) as (client, tp):
            together = await asyncio.gather(*(client.send(r) for r in requests))
            return tp, together

    tp, results = asyncio.run(go())
    assert tp == 1 and all(r.ok for r in results), [r.error for r in results]
    assert [(r.prompt_len, r.output_len) for r in results] == [(3, 4), (3, 5), (3, 6)]
    assert all(r.e2e_s >= r.ttft_s > 0 and len(r.itl_s) == r.output_len - 1 for r in results)
