"""What the engine reports about itself, as a small observer interface (no Ray, no Prometheus here).

The engine core calls these hooks from its own thread, once per event or per step (never per token);
``raytp.serve.metrics`` turns them into Prometheus metrics through Ray, and unit tests record them. Hooks must be
cheap and must not raise.
"""

from __future__ import annotations


class EngineStats:
    """No-op observer; subclass and override what you need. Times are seconds (``time.monotonic``)."""

    def on_step(self, num_running: int, num_waiting: int, kv_cache_usage: float) -> None:
        """After every step: requests holding a batch slot, requests queued for one, fraction of KV blocks held."""

    def on_preempted(self, num: int) -> None:
        """``num`` running requests were preempted (KV blocks ran out; they will be recomputed)."""

    def on_prefix_lookup(self, num_tokens: int, num_hit: int) -> None:
        """An admitted request looked up ``num_tokens`` prompt tokens in the prefix cache and found ``num_hit``."""

    def on_scheduled(self, queue_s: float) -> None:
        """A request got a batch slot after waiting ``queue_s`` in the queue."""

    def on_tokens(self, first_s: list[float], gaps_s: list[float]) -> None:
        """Once per step, the tokens it gave requests: times to first token (``first_s``: from arrival, one per
        request whose first token this was) and times since each other request's previous token (``gaps_s``)."""

    def on_finished(self, reason: str, e2e_s: float, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """A request ended: ``reason`` is stop | length | abort | error; ``e2e_s`` from arrival to end."""
