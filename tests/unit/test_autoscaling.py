"""Autoscaling on time to first token (raytp/serve/autoscaling.py): the replica's windowed p90, and the policy's
decision from the replicas' reports."""

from types import SimpleNamespace

import pytest

from raytp.serve.autoscaling import METRIC, TTFTPolicy, TTFTWindow


def test_the_window_reports_the_p90_of_its_last_seconds_only():
    now = [100.0]
    window = TTFTWindow(window_s=30, clock=lambda: now[0])
    assert window.p90() == 0.0
    for i in range(1, 11):  # 0.1 .. 1.0 s
        window.add(i / 10)
    assert window.p90() == pytest.approx(0.9)
    now[0] += 20
    window.add(5.0)
    assert window.p90() == pytest.approx(1.0)  # 11 samples: the 10th smallest
    now[0] += 15  # the first ten fall out of the window
    assert window.p90() == 5.0
    now[0] += 31
    assert window.p90() == 0.0


def ctx(current: int, reports: dict | None, target: int | None = None):
    return SimpleNamespace(current_num_replicas=current, target_num_replicas=target or current,
                           aggregated_metrics=None if reports is None else {METRIC: reports})


def test_the_policy_scales_on_the_worst_replicas_ttft_with_hysteresis():
    policy = TTFTPolicy(target_ttft_s=2.0)
    assert policy(ctx(2, {"a": 0.4, "b": 2.5}))[0] == 3  # one replica's users wait too long
    assert policy(ctx(2, {"a": 1.5, "b": 1.9}))[0] == 2  # under target, above half of it: hold
    assert policy(ctx(2, {"a": 0.2, "b": 0.9}))[0] == 1  # all well under: one fewer (Serve keeps min_replicas)
    assert policy(ctx(2, {}, target=3))[0] == 3  # no report yet: hold the current target
    assert policy(ctx(2, None, target=2))[0] == 2
    with pytest.raises(ValueError):
        TTFTPolicy(target_ttft_s=0)
