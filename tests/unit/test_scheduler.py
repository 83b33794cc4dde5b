"""Scheduling policies over the paged KV cache, driven by a fake model (each sampled row gets a token)."""

import pytest

from raytp.engine.scheduler import SchedulerConfig, Sequence
from raytp.errors import InvalidRequestError, QueueFullError
from raytp.messages import SamplingParams


def seq(i: int, n_prompt: int = 3, max_tokens: int = 4, first: int = 0) -> Sequence:
    return Sequence(f"r{i}", tuple(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens))


def build(num_blocks=64, block_size=4, **kw):
    return SchedulerConfig(**{"max_num_seqs": 8, "max_queue_size": 8, "max_num_batched_tokens": 100, **kw},
                           block_size=block_size).build(num_blocks)


def run_step(s):
    """Schedule one step and play the model: every row that reaches its sequence's end samples a token (7);
    sequences reaching max_tokens finish. Returns the step's [(seq_id, num_tokens)]."""
    out = s.schedule()
    sampled = [seq for seq, n in out.rows if seq.num_computed + n == len(seq.token_ids)]
    s.advance(out)
    for seq, _ in out.rows:
        s.commit(seq)
    for seq in sampled:
        seq.append_token(7)
        if seq.num_output_tokens >= seq.params.max_tokens:
            seq.finish_reason = "length"
    return [(seq.seq_id, n) for seq, n in out.rows], out


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_idle_when_empty_queue_bounded_and_too_long_rejected(policy):
    s = build(num_blocks=5, policy=policy, max_queue_size=2)  # 4 usable blocks of 4 = 16 tokens
    assert s.schedule().idle
    with pytest.raises(InvalidRequestError, match="holds 16"):
        s.add(seq(9, n_prompt=10, max_tokens=7))
    s.add(seq(0))
    s.add(seq(1))
    with pytest.raises(QueueFullError):
        s.add(seq(2))


def test_static_runs_a_batch_to_completion_before_admitting_more():
    s = build(policy="static", max_num_seqs=2)
    for i in range(3):
        s.add(seq(i, max_tokens=2 + i))
    assert run_step(s)[0] == [("r0", 3), ("r1", 3)]  # whole prompts
    assert run_step(s)[0] == [("r0", 1), ("r1", 1)]
    assert run_step(s)[0] == [("r1", 1)]  # r0 done: the batch keeps running without it, r2 waits
    rows, out = run_step(s)
    assert rows == [("r2", 3)] and out.finished_ids == ("r0", "r1")


def test_long_prompt_is_prefilled_in_chunks_while_running_rows_decode():
    s = build(max_num_batched_tokens=8)
    s.add(seq(0, n_prompt=2, max_tokens=20))
    assert run_step(s)[0] == [("r0", 2)]
    s.add(seq(1, n_prompt=20, max_tokens=2))
    steps = [run_step(s)[0] for _ in range(4)]
    assert steps == [[("r0", 1), ("r1", 7)], [("r0", 1), ("r1", 7)], [("r0", 1), ("r1", 6)],
                     [("r0", 1), ("r1", 1)]], "r0 decodes every step; r1's 20 tokens take 3 chunks, then it decodes"


def test_newest_is_preempted_when_blocks_run_out_and_recomputed_with_its_output():
    s = build(num_blocks=5, block_size=4, enable_prefix_caching=False)  # 16 tokens in all
    a, b = seq(0, n_prompt=4, max_tokens=8), seq(1, n_prompt=4, max_tokens=8, first=50)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 1 block each (+1 block each for their first decode below)
    run_step(s)
    run_step(s)
    run_step(s)
    run_step(s)  # both: 8 tokens computed in 2 blocks each (all 4 taken), a 9th sampled
    rows, out = run_step(s)  # a needs a 3rd block for its 9th: b (newest) is preempted
    assert out.num_preempted == 1 and rows == [("r0", 1)] and s.waiting[0] is b
    assert b.num_computed == 0 and b.kv.table == [] and b.num_output_tokens == 5
    while not a.finished:
        run_step(s)
    rows, _ = run_step(s)
    assert rows == [("r1", 9)], "b is recomputed from prompt + the 5 tokens it had"
    while not b.finished:
        run_step(s)
    assert b.num_output_tokens == 8 and s.num_preemptions == 1


def test_a_prefix_hit_computes_only_the_rest():
    s = build(block_size=4)
    s.add(seq(0, n_prompt=10, max_tokens=1))
    assert run_step(s)[0] == [("r0", 10)]
    s.add(seq(1, n_prompt=13, max_tokens=1))
    assert run_step(s)[0] == [("r1", 5)], "8 of 13 tokens are cached in 2 full blocks"
    assert s.kv.prefix_hit_tokens == 8 and s.kv.prefix_queried_tokens == 23


def test_abort_frees_blocks_of_waiting_and_running():
    s = build(num_blocks=9)
    a, b = seq(0, max_tokens=20), seq(1)
    s.add(a)
    run_step(s)
    s.add(b)
    s.abort("r0")
    s.abort("r1")
    _, out = run_step(s)
    assert out.finished_ids == ("r0",) and s.kv.num_free == 8


def test_a_long_prompt_arriving_never_stalls_decoding_rows():
    """Running rows are served first and waiting prompts only get the budget they leave, so every decoding row gets
    its token in every step while a long prompt is prefilled in chunks."""
    s = build(max_num_batched_tokens=8, max_num_seqs=4)
    for i in range(3):
        s.add(seq(i, n_prompt=2, max_tokens=30, first=10 * i))
    run_step(s)
    s.add(seq(3, n_prompt=40, max_tokens=2))
    for _ in range(8):  # 40 prompt tokens at 8 - 3 = 5 per step
        rows, _ = run_step(s)
        assert rows[:3] == [("r0", 1), ("r1", 1), ("r2", 1)] and rows[3] == ("r3", 5)
    rows, _ = run_step(s)
    assert rows == [("r0", 1), ("r1", 1), ("r2", 1), ("r3", 1)]
