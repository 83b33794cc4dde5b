"""raytp's Prometheus metrics, exported through Ray's metrics agent (scrape each node's metrics port).

``ray.serve.metrics`` adds the ``application``, ``deployment`` and ``replica`` tags, so every series is per
replica (= per TP group). Ray prefixes exported names with ``ray_``: ``raytp_time_to_first_token_seconds``
is scraped as ``ray_raytp_time_to_first_token_seconds_bucket`` etc. ``NAMES`` is the list the Grafana
dashboard in ``deploy/grafana/`` and the tests check against.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from raytp.engine.stats import EngineStats
from raytp.serve.autoscaling import TTFTWindow

# Latency buckets (seconds): token gaps on fast devices are milliseconds, CPU prefill of long prompts many seconds.
_FAST = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0]
_SLOW = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0]

NAMES = {
    "raytp_time_to_first_token_seconds": "histogram",
    "raytp_inter_token_latency_seconds": "histogram",
    "raytp_e2e_request_latency_seconds": "histogram",
    "raytp_request_queue_time_seconds": "histogram",
    "raytp_ingress_request_seconds": "histogram",
    "raytp_num_requests_running": "gauge",
    "raytp_num_requests_waiting": "gauge",
    "raytp_batch_slot_usage": "gauge",
    "raytp_kv_cache_usage": "gauge",
    "raytp_num_preemptions": "counter",
    "raytp_prefix_cache_queries": "counter",
    "raytp_prefix_cache_hits": "counter",
    "raytp_gang_healthy": "gauge",
    "raytp_model_load_seconds": "gauge",
    "raytp_prompt_tokens": "counter",
    "raytp_generation_tokens": "counter",
    "raytp_requests_finished": "counter",
    "raytp_request_errors": "counter",
}


# The same measurements under vLLM's names and its ``model_name`` label, for dashboards and autoscalers built for
# vLLM on Ray: vLLM's ``vllm:time_to_first_token_seconds`` is ``ray_vllm_time_to_first_token_seconds`` once Ray
# exports it (Ray refuses ':' in names), the series Ray Serve LLM's own Grafana dashboards query.
VLLM_NAMES = {
    "vllm_time_to_first_token_seconds": "histogram",
    "vllm_inter_token_latency_seconds": "histogram",
    "vllm_time_per_output_token_seconds": "histogram",
    "vllm_e2e_request_latency_seconds": "histogram",
    "vllm_request_queue_time_seconds": "histogram",
    "vllm_num_requests_running": "gauge",
    "vllm_num_requests_waiting": "gauge",
    "vllm_kv_cache_usage_perc": "gauge",
    "vllm_num_preemptions": "counter",
    "vllm_prefix_cache_queries": "counter",
    "vllm_prefix_cache_hits": "counter",
    "vllm_prompt_tokens": "counter",
    "vllm_generation_tokens": "counter",
    "vllm_request_success": "counter",
}


class VllmMetrics:
    """``VLLM_NAMES``, fed by ``ServerMetrics``'s hooks (vLLM's meanings: per-token gaps for both inter-token
    names, KV usage as a fraction, finished requests by ``finished_reason``; errors are not successes)."""

    def __init__(self, model: str):
        key = ("model_name",)
        self.ttft = Histogram("vllm_time_to_first_token_seconds", "vLLM's name of raytp_time_to_first_token_seconds.",
                              _SLOW, tag_keys=key)
        self.itl = Histogram("vllm_inter_token_latency_seconds", "vLLM's name of raytp_inter_token_latency_seconds.",
                             _FAST, tag_keys=key)
        self.tpot = Histogram("vllm_time_per_output_token_seconds", "vLLM's older name of the same token gaps.", _FAST,
                              tag_keys=key)
        self.e2e = Histogram("vllm_e2e_request_latency_seconds", "vLLM's name of raytp_e2e_request_latency_seconds.",
                             _SLOW, tag_keys=key)
        self.queue = Histogram("vllm_request_queue_time_seconds", "vLLM's name of raytp_request_queue_time_seconds.",
                               _SLOW, tag_keys=key)
        self.running = Gauge("vllm_num_requests_running", "Requests holding a batch slot.", tag_keys=key)
        self.waiting = Gauge("vllm_num_requests_waiting", "Requests queued for a batch slot.", tag_keys=key)
        self.kv_usage = Gauge("vllm_kv_cache_usage_perc", "KV cache usage, a fraction (as vLLM's).", tag_keys=key)
        self.preemptions = Counter("vllm_num_preemptions", "Requests preempted.", tag_keys=key)
        self.prefix_queries = Counter("vllm_prefix_cache_queries", "Prompt tokens looked up.", tag_keys=key)
        self.prefix_hits = Counter("vllm_prefix_cache_hits", "Prompt tokens found in the cache.", tag_keys=key)
        self.prompt_tokens = Counter("vllm_prompt_tokens", "Prompt tokens of finished requests.", tag_keys=key)
        self.generation_tokens = Counter("vllm_generation_tokens", "Generated tokens.", tag_keys=key)
        self.success = Counter("vllm_request_success", "Requests finished, but for errors, by finish reason.",
                               tag_keys=key + ("finished_reason",))
        for m in vars(self).values():
            m.set_default_tags({"model_name": model})


class ServerMetrics(EngineStats):
    """Metrics of one LLMServer replica: the engine's hooks plus gang health and per-rank load time."""

    def __init__(self, model: str, max_num_seqs: int):
        self._max_num_seqs = max_num_seqs
        self._last_step: tuple | None = None  # the gauges' values as last set
        self.vllm = VllmMetrics(model)
        self.ttft_window = TTFTWindow()  # what the replica reports to Serve's autoscaler (raytp.serve.autoscaling)
        tags = {"model": model}
        self.ttft = Histogram("raytp_time_to_first_token_seconds", "Time from arrival at the engine to the first "
                              "token.", _SLOW, tag_keys=("model",))
        self.itl = Histogram("raytp_inter_token_latency_seconds", "Time between two tokens of one request.", _FAST,
                             tag_keys=("model",))
        self.e2e = Histogram("raytp_e2e_request_latency_seconds", "Time a request spent in the engine, arrival to "
                             "end.", _SLOW, tag_keys=("model",))
        self.queue = Histogram("raytp_request_queue_time_seconds", "Time a request waited for a batch slot.", _SLOW,
                               tag_keys=("model",))
        self.running = Gauge("raytp_num_requests_running", "Requests holding a batch slot.", tag_keys=("model",))
        self.waiting = Gauge("raytp_num_requests_waiting", "Requests queued for a batch slot.", tag_keys=("model",))
        self.slots = Gauge("raytp_batch_slot_usage", "Fraction of max_num_seqs batch slots (KV rows) in use.",
                           tag_keys=("model",))
        self.kv_usage = Gauge("raytp_kv_cache_usage", "Fraction of the paged KV cache's blocks held by requests.",
                              tag_keys=("model",))
        self.preemptions = Counter("raytp_num_preemptions", "Running requests preempted because KV blocks ran out "
                                   "(recomputed later).", tag_keys=("model",))
        self.prefix_queries = Counter("raytp_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      tag_keys=("model",))
        self.prefix_hits = Counter("raytp_prefix_cache_hits", "Prompt tokens found in the prefix cache (hit rate = "
                                   "hits / queries).", tag_keys=("model",))
        self.healthy = Gauge("raytp_gang_healthy", "1 while every rank of this replica's TP gang is alive.",
                             tag_keys=("model",))
        self.load_s = Gauge("raytp_model_load_seconds", "Time each rank took to load and shard the model.",
                            tag_keys=("model", "rank"))
        self.prompt_tokens = Counter("raytp_prompt_tokens", "Prompt tokens of finished requests.", tag_keys=("model",))
        self.generation_tokens = Counter("raytp_generation_tokens", "Generated tokens.", tag_keys=("model",))
        self.finished = Counter("raytp_requests_finished", "Requests ended, by finish reason (stop, length, abort, "
                                "error).", tag_keys=("model", "finished_reason"))
        for m in (self.ttft, self.itl, self.e2e, self.queue, self.running, self.waiting, self.slots, self.kv_usage,
                  self.preemptions, self.prefix_queries, self.prefix_hits, self.healthy,
                  self.load_s, self.prompt_tokens, self.generation_tokens, self.finished):
            m.set_default_tags(dict(tags))  # Serve adds its tags to the dict it is given

    # ---- EngineStats ----
    def on_step(self, num_running: int, num_waiting: int, kv_cache_usage: float) -> None:
        # set only what changed: seven Ray gauge writes per step showed in the replica's profile (tiny model, 16
        # streams), and in steady decoding the values rarely move
        if self._last_step == (num_running, num_waiting, kv_cache_usage):
            return
        self._last_step = (num_running, num_waiting, kv_cache_usage)
        self.running.set(num_running)
        self.waiting.set(num_waiting)
        self.slots.set(num_running / self._max_num_seqs)
        self.kv_usage.set(kv_cache_usage)
        self.vllm.running.set(num_running)
        self.vllm.waiting.set(num_waiting)
        self.vllm.kv_usage.set(kv_cache_usage)

    def on_preempted(self, num: int) -> None:
        self.preemptions.inc(num)
        self.vllm.preemptions.inc(num)

    def on_prefix_lookup(self, num_tokens: int, num_hit: int) -> None:
        self.prefix_queries.inc(num_tokens)
        self.vllm.prefix_queries.inc(num_tokens)
        if num_hit:
            self.prefix_hits.inc(num_hit)
            self.vllm.prefix_hits.inc(num_hit)

    def on_scheduled(self, queue_s: float) -> None:
        self.queue.observe(queue_s)
        self.vllm.queue.observe(queue_s)

    def on_tokens(self, first_s: list[float], gaps_s: list[float]) -> None:
        for latency_s in first_s:
            self.ttft.observe(latency_s)
            self.vllm.ttft.observe(latency_s)
            self.ttft_window.add(latency_s)
        for latency_s in gaps_s:
            self.itl.observe(latency_s)
            self.vllm.itl.observe(latency_s)
            self.vllm.tpot.observe(latency_s)
        if first_s or gaps_s:
            self.generation_tokens.inc(len(first_s) + len(gaps_s))
            self.vllm.generation_tokens.inc(len(first_s) + len(gaps_s))

    def on_finished(self, reason: str, e2e_s: float, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self.finished.inc(tags={"finished_reason": reason})
        self.e2e.observe(e2e_s)
        self.vllm.e2e.observe(e2e_s)
        if reason != "error":
            self.vllm.success.inc(tags={"finished_reason": reason})
        if num_prompt_tokens:
            self.prompt_tokens.inc(num_prompt_tokens)
            self.vllm.prompt_tokens.inc(num_prompt_tokens)

    # ---- replica ----
    def gang(self, healthy: bool) -> None:
        self.healthy.set(1 if healthy else 0)

    def loaded(self, reports) -> None:
        for r in reports:
            self.load_s.set(r.load_s, tags={"rank": str(r.rank)})


class IngressMetrics:
    """Metrics of the ingress: whole-request time as the HTTP server sees it, and errors by type."""

    def __init__(self):
        self.request_s = Histogram("raytp_ingress_request_seconds", "Time from the ingress receiving a request to "
                                   "its response (streams: to the last chunk); minus the engine's e2e latency, "
                                   "the time spent in ingress and routing.", _SLOW, tag_keys=("route",))
        self.errors = Counter("raytp_request_errors", "Requests answered with an error, by OpenAI error type.",
                              tag_keys=("error_type", "status"))

    def error(self, error_type: str, status: int) -> None:
        self.errors.inc(tags={"error_type": error_type, "status": str(status)})
