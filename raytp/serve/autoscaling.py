"""Autoscaling on what users feel: time to first token (as Ray Serve LLM's TTFT policy does), next to Serve's own
queue-length policy.

Each server replica reports, every ``metrics_interval_s``, the 90th percentile of its requests' times to first
token over the last ``WINDOW_S`` seconds (``TTFTWindow``, fed by the engine's stats hook;
``LLMServer.record_autoscaling_stats``). ``TTFTPolicy`` (``autoscaling_config.policy.policy_function``) asks for one
more replica while the worst replica's p90 is above ``target_ttft_s``, and for one fewer while every replica's is
below ``scale_down_below`` × target (hysteresis: a fleet just under target does not flap); Serve applies
``min_replicas`` / ``max_replicas`` and the up/down-scale delays on top. A replica with no request in the window
reports 0. In serve_config.yaml::

    deployments:
      - name: LLMServer
        autoscaling_config:
          min_replicas: 1
          max_replicas: 4
          policy: {policy_function: "raytp.serve.autoscaling:TTFTPolicy", policy_kwargs: {target_ttft_s: 2.0}}
"""

from __future__ import annotations

import collections
import math
import threading
import time

METRIC = "raytp_ttft_p90_s"
WINDOW_S = 30.0


class TTFTWindow:
    """Times to first token of the last ``window_s`` seconds; ``p90()`` of them (0 when there are none). Added to
    from the engine core's thread, read on the replica's loop."""

    def __init__(self, window_s: float = WINDOW_S, clock=time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, ttft_s: float) -> None:
        with self._lock:
            self._samples.append((self.clock(), ttft_s))

    def p90(self) -> float:
        horizon = self.clock() - self.window_s
        with self._lock:
            while self._samples and self._samples[0][0] < horizon:
                self._samples.popleft()
            values = sorted(v for _, v in self._samples)
        if not values:
            return 0.0
        return values[math.ceil(0.9 * len(values)) - 1]


class TTFTPolicy:
    """A Serve autoscaling policy (a class: Serve passes ``policy_kwargs`` to it) over the replicas' reported TTFT
    p90. Returns (desired replicas, policy state) per Serve's policy contract."""

    def __init__(self, target_ttft_s: float = 2.0, scale_down_below: float = 0.5):
        if target_ttft_s <= 0 or not 0 < scale_down_below < 1:
            raise ValueError("TTFTPolicy needs target_ttft_s > 0 and 0 < scale_down_below < 1")
        self.target_ttft_s = target_ttft_s
        self.scale_down_below = scale_down_below

    def __call__(self, ctx) -> tuple[int, dict]:
        current = ctx.current_num_replicas
        per_replica = (ctx.aggregated_metrics or {}).get(METRIC, {})
        if not per_replica:  # no report yet (replicas starting): hold
            return ctx.target_num_replicas, {}
        worst = max(per_replica.values())
        if worst > self.target_ttft_s:
            return current + 1, {}
        if worst < self.scale_down_below * self.target_ttft_s:
            return current - 1, {}  # Serve keeps it within min_replicas
        return current, {}
