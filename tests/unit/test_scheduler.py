import pytest

from raytp.engine.scheduler import Sequence, StaticBatchScheduler
from raytp.engine.types import SamplingParams
from raytp.errors import QueueFullError


def seq(i: int) -> Sequence:
    return Sequence(f"r{i}", (1, 2, 3), SamplingParams(max_tokens=4))


def test_idle_when_empty():
    assert StaticBatchScheduler(2, 4).schedule().kind == "idle"


def test_batches_up_to_max_num_seqs_and_runs_them_to_completion():
    s = StaticBatchScheduler(max_num_seqs=2, max_queue_size=8)
    for i in range(3):
        s.add(seq(i))
    out = s.schedule()
    assert out.kind == "prefill" and [q.seq_id for q in out.seqs] == ["r0", "r1"]
    assert s.schedule().kind == "decode"
    out.seqs[0].finish_reason = "stop"
    assert s.schedule().kind == "decode", "the batch runs until every sequence has finished"
    out.seqs[1].finish_reason = "length"
    nxt = s.schedule()
    assert nxt.kind == "prefill" and [q.seq_id for q in nxt.seqs] == ["r2"]
    nxt.seqs[0].finish_reason = "stop"
    assert s.schedule().kind == "release"
    assert s.schedule().kind == "idle"


def test_queue_is_bounded():
    s = StaticBatchScheduler(max_num_seqs=1, max_queue_size=2)
    s.add(seq(0))
    s.add(seq(1))
    with pytest.raises(QueueFullError):
        s.add(seq(2))


def test_abort_waiting_and_running():
    s = StaticBatchScheduler(max_num_seqs=1, max_queue_size=4)
    s.add(seq(0))
    s.add(seq(1))
    out = s.schedule()
    s.abort("r1")
    assert s.num_waiting == 0
    s.abort("r0")
    assert out.seqs[0].finish_reason == "abort"
    assert s.schedule().kind == "release"


def test_drain_returns_unfinished():
    s = StaticBatchScheduler(max_num_seqs=1, max_queue_size=4)
    s.add(seq(0))
    s.add(seq(1))
    s.schedule()
    assert [q.seq_id for q in s.drain()] == ["r0", "r1"]
    assert s.schedule().kind == "idle"
