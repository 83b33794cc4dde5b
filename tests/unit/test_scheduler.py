import pytest

from raytp.engine.scheduler import (
    ContinuousBatchScheduler,
    Sequence,
    StaticBatchScheduler,
)
from raytp.errors import QueueFullError
from raytp.messages import SamplingParams


def seq(i: int, n_prompt: int = 3) -> Sequence:
    return Sequence(f"r{i}", tuple(range(n_prompt)), SamplingParams(max_tokens=4))


def ids(out):
    return [s.seq_id for s in out.seqs]


@pytest.mark.parametrize("cls", [StaticBatchScheduler, lambda a, b: ContinuousBatchScheduler(a, b, 100)])
def test_idle_when_empty_and_queue_bounded(cls):
    s = cls(1, 2)
    assert s.schedule().kind == "idle"
    s.add(seq(0))
    s.add(seq(1))
    with pytest.raises(QueueFullError):
        s.add(seq(2))


def test_static_runs_a_batch_to_completion():
    s = StaticBatchScheduler(max_num_seqs=2, max_queue_size=8)
    for i in range(3):
        s.add(seq(i))
    out = s.schedule()
    assert out.kind == "prefill" and ids(out) == ["r0", "r1"]
    assert s.schedule().kind == "decode"
    out.seqs[0].finish_reason = "stop"
    assert s.schedule().kind == "decode", "the batch runs until every sequence has finished"
    out.seqs[1].finish_reason = "length"
    nxt = s.schedule()
    assert nxt.kind == "prefill" and ids(nxt) == ["r2"] and nxt.finished_ids == ("r0", "r1")
    nxt.seqs[0].finish_reason = "stop"
    assert s.schedule().finished_ids == ("r2",)
    assert s.schedule().kind == "idle"


def test_continuous_admits_into_free_slots_and_frees_finished_rows():
    s = ContinuousBatchScheduler(max_num_seqs=2, max_queue_size=8, max_num_batched_tokens=100)
    for i in range(3):
        s.add(seq(i))
    first = s.schedule()
    assert first.kind == "prefill" and ids(first) == ["r0", "r1"]
    assert s.schedule().kind == "decode"
    first.seqs[0].finish_reason = "stop"
    out = s.schedule()
    assert out.kind == "prefill" and ids(out) == ["r2"] and out.finished_ids == ("r0",)
    out = s.schedule()
    assert out.kind == "decode" and ids(out) == ["r1", "r2"], "row order: running rows, then new ones"


def test_prefill_never_twice_in_a_row_while_decoding():
    s = ContinuousBatchScheduler(max_num_seqs=8, max_queue_size=8, max_num_batched_tokens=5)
    for i in range(3):
        s.add(seq(i, n_prompt=4))
    assert ids(s.schedule()) == ["r0"], "token budget: 4 + 4 > 5"
    assert s.schedule().kind == "decode", "running rows get a decode step between prefills"
    assert ids(s.schedule()) == ["r1"]
    assert s.schedule().kind == "decode"


def test_long_prompt_still_admitted_alone():
    s = ContinuousBatchScheduler(max_num_seqs=8, max_queue_size=8, max_num_batched_tokens=5)
    s.add(seq(0, n_prompt=50))
    assert ids(s.schedule()) == ["r0"]


def test_abort_waiting_and_running():
    s = ContinuousBatchScheduler(max_num_seqs=1, max_queue_size=4, max_num_batched_tokens=100)
    s.add(seq(0))
    s.add(seq(1))
    out = s.schedule()
    s.abort("r1")
    assert s.num_waiting == 0
    s.abort("r0")
    assert out.seqs[0].finish_reason == "abort"
    rel = s.schedule()
    assert rel.kind == "release" and rel.finished_ids == ("r0",)


def test_drain_returns_unfinished():
    s = ContinuousBatchScheduler(max_num_seqs=1, max_queue_size=4, max_num_batched_tokens=100)
    s.add(seq(0))
    s.add(seq(1))
    s.schedule()
    assert [q.seq_id for q in s.drain()] == ["r0", "r1"]
    assert s.schedule().kind == "idle"
