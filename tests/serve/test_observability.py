"""Operators' view of a TP=2-shaped app over a scripted gang: `raytp bench` against it, and Prometheus metrics
scraped from Ray's metrics port. (Rank logs need real ranks: tests/integration/test_gang_http.py.)"""

import json
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import URL
from tests.serve.conftest import MODEL


def test_fresh_replica_reports_no_finished_requests(app):
    """The warm-up generation that proves a new gang is not a request: it is in no counter."""
    health = requests.get(URL + "/health", timeout=30).json()
    assert health["num_finished"] == {} and health["num_running"] == health["num_waiting"] == 0


def test_raytp_bench_reports_every_metric(app, tmp_path):
    cmd = [sys.executable, "-m", "raytp.cli", "bench", "--base-url", URL, "--model", MODEL, "--num-prompts", "12",
           "--max-concurrency", "2,4", "--random-input-len", "24", "--random-range-ratio", "0.5",
           "--random-output-len", "8", "--ignore-eos", "--request-rate", "50", "--goodput", "ttft:60000", "tpot:60000",
           "--roofline", "--roofline-output-len", "12", "--output-dir", str(tmp_path), "--result-filename", "b",
           "--disable-tqdm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    target = result["targets"]["endpoint"]
    assert target["tp"] == 2 and [r["max_concurrency"] for r in target["runs"]] == [2, 4]
    for run in target["runs"]:
        assert (run["completed"], run["failed"]) == (12, 0)
        assert run["total_output_tokens"] == 12 * 8 and 12 * 12 <= run["total_input_tokens"] <= 12 * 36
        for key in ("request_throughput", "output_throughput", "total_token_throughput", "request_goodput"):
            assert run[key] > 0, key
        assert run["request_goodput"] == pytest.approx(run["request_throughput"])  # generous SLOs: all are good
        for name in ("ttft", "tpot", "itl", "e2el"):
            for stat in ("mean", "median", "p90", "p99"):
                assert run[f"{stat}_{name}_ms"] > 0, (stat, name)
        assert run["median_ttft_ms"] <= run["median_e2el_ms"]
    roof = target["roofline"]
    assert "error" not in roof, roof
    assert roof["tp"] == 2 and roof["decode_tok_s"] > 0 and roof["bandwidth_gbps"] > 0
    expected = roof["decode_tok_s"] * roof["weight_bytes"] / (roof["bandwidth_gbps"] * 1e9)
    assert roof["efficiency"] == pytest.approx(expected)
    md = (tmp_path / "b.md").read_text()
    assert "| endpoint | 2 | 12 | 0 |" in md and "| endpoint | 4 | 12 | 0 |" in md and "Roofline" in md
    assert (tmp_path / "b_latency.png").stat().st_size > 1000
    assert (tmp_path / "b_throughput_latency.png").stat().st_size > 1000


def scrape(port: int) -> dict:
    """{(metric name, frozenset(labels)): value} from Ray's Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    """Sum of the series called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_prometheus_metrics_after_requests(app, ray_session):
    """Counters and histograms are compared with a scrape taken before the requests, gauges are read for this
    app's replica only: what earlier tests left in the same Ray instance cannot change the outcome."""
    from raytp.serve.metrics import NAMES, VLLM_NAMES

    port = ray_session.nodes()[0]["MetricsExportPort"]
    replica = requests.get(URL + "/health", timeout=30).json()["replica_id"]
    before = scrape(port)
    shared = list(range(20, 60))  # 2 full KV blocks of 16: requests after the first hit the prefix cache
    for i in range(4):
        r = requests.post(URL + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": shared + [13 + i], "max_tokens": 6, "ignore_eos": True, "stream": i % 2 == 0})
        assert r.status_code == 200
    bad = requests.post(URL + "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 0}, timeout=30)
    assert bad.status_code == 400

    def grew(samples, name, **labels) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    deadline = time.monotonic() + 90  # Ray exports metrics every few seconds
    while True:
        samples = scrape(port)
        names = {n for n, _ in samples}
        # a counter appears once incremented: nothing here runs out of KV blocks, so no preemption is counted
        exported = [m for m in NAMES | VLLM_NAMES if m not in ("raytp_num_preemptions", "vllm_num_preemptions")]
        missing = [m for m in exported if not any(n.startswith("ray_" + m) for n in names)]
        if (not missing and grew(samples, "ray_raytp_generation_tokens_total", replica=replica) >= 24
                and grew(samples, "ray_raytp_request_errors_total", status="400") >= 1
                and grew(samples, "ray_raytp_ingress_request_seconds_count", route="/v1/completions") >= 4):
            break
        assert time.monotonic() < deadline, f"metrics missing after 90 s: {missing}"
        time.sleep(1)

    assert grew(samples, "ray_raytp_requests_finished_total", replica=replica, finished_reason="length") == 4
    assert grew(samples, "ray_raytp_prompt_tokens_total", replica=replica) == 4 * 41
    assert grew(samples, "ray_raytp_prefix_cache_queries_total", replica=replica) == 4 * 41
    assert grew(samples, "ray_raytp_prefix_cache_hits_total", replica=replica) == 3 * 32
    assert grew(samples, "ray_raytp_generation_tokens_total", replica=replica) == 24
    assert grew(samples, "ray_raytp_time_to_first_token_seconds_count", replica=replica) == 4
    assert grew(samples, "ray_raytp_inter_token_latency_seconds_count", replica=replica) == 4 * 5
    assert grew(samples, "ray_raytp_e2e_request_latency_seconds_count", replica=replica) == 4
    assert grew(samples, "ray_raytp_request_queue_time_seconds_count", replica=replica) == 4
    assert grew(samples, "ray_raytp_request_errors_total", error_type="invalid_request_error", status="400") >= 1
    # the same under vLLM's names and label, for dashboards built for vLLM (Ray Serve LLM's query ray_vllm_*)
    vllm = {"replica": replica, "model_name": MODEL}
    assert grew(samples, "ray_vllm_time_to_first_token_seconds_count", **vllm) == 4
    assert grew(samples, "ray_vllm_inter_token_latency_seconds_count", **vllm) == 4 * 5
    assert grew(samples, "ray_vllm_time_per_output_token_seconds_count", **vllm) == 4 * 5
    assert grew(samples, "ray_vllm_e2e_request_latency_seconds_count", **vllm) == 4
    assert grew(samples, "ray_vllm_request_queue_time_seconds_count", **vllm) == 4
    assert grew(samples, "ray_vllm_prompt_tokens_total", **vllm) == 4 * 41
    assert grew(samples, "ray_vllm_generation_tokens_total", **vllm) == 24
    assert grew(samples, "ray_vllm_prefix_cache_queries_total", **vllm) == 4 * 41
    assert grew(samples, "ray_vllm_prefix_cache_hits_total", **vllm) == 3 * 32
    assert grew(samples, "ray_vllm_request_success_total", finished_reason="length", **vllm) == 4
    assert value(samples, "ray_vllm_num_requests_running", **vllm) == 0
    assert value(samples, "ray_vllm_num_requests_waiting", **vllm) == 0
    assert any(n == "ray_vllm_kv_cache_usage_perc" and vllm.items() <= dict(ls).items() for n, ls in samples)
    # gauges of this replica (per replica: Serve's tags name the deployment and replica)
    assert value(samples, "ray_raytp_gang_healthy", replica=replica, deployment="LLMServer") == 1
    assert value(samples, "ray_raytp_num_requests_running", replica=replica) == 0
    assert value(samples, "ray_raytp_batch_slot_usage", replica=replica) == 0
    for rank in ("0", "1"):
        assert any(n == "ray_raytp_model_load_seconds" and dict(ls).get("replica") == replica
                   and dict(ls).get("rank") == rank for n, ls in samples)

