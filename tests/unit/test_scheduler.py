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


def test_a_prompt_is_never_cut_into_a_one_token_chunk():
    """A one-token piece of a prompt would run M = 1 paths that round differently: its greedy answer would depend
    on how it was cut (``_chunk``)."""
    s = build(max_num_batched_tokens=8)
    s.add(seq(0, n_prompt=17, max_tokens=2))  # 8 + 8 would leave 1: 8 + 7 + 2
    assert [run_step(s)[0] for _ in range(3)] == [[("r0", 8)], [("r0", 7)], [("r0", 2)]]
    s = build(max_num_batched_tokens=8)
    s.add(seq(0, n_prompt=7, max_tokens=3))
    s.add(seq(1, n_prompt=20, max_tokens=2))
    # step 1: 7 + a one-token start for r1 would be a one-token chunk: r1 waits for the next step
    assert run_step(s)[0] == [("r0", 7)]
    assert run_step(s)[0] == [("r0", 1), ("r1", 7)]


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


# ---- async scheduling: a step is scheduled while the one before still samples ------------------------------------
def launch(s):
    """Schedule and send a step without its tokens (async scheduling): its sampled rows' tokens are in flight."""
    out = s.schedule()
    sampled = [q for q, n in out.rows if q.num_computed + n == len(q.token_ids) + q.num_inflight]
    s.advance(out)
    for q in sampled:
        q.num_inflight += 1
    return out, sampled


def land(seqs, token: int = 7):
    """The in-flight tokens of ``seqs`` come back."""
    for q in seqs:
        q.num_inflight -= 1
        q.append_token(token)


def test_ready_waits_on_a_token_in_flight_only_when_it_may_be_the_last_or_a_grammar_needs_it():
    plain = seq(0, max_tokens=4)
    assert plain.ready
    plain.num_inflight = 1
    assert plain.ready, "its next row carries PENDING_TOKEN"
    plain.token_ids += [7, 7]  # 2 outputs + 1 in flight: one more may still follow
    assert plain.ready
    plain.token_ids.append(7)  # 3 outputs + 1 in flight = max_tokens: that token is its last
    assert not plain.ready
    constrained = Sequence("g", (1, 2), SamplingParams(max_tokens=9, grammar="start: /a+/"))
    constrained.num_inflight = 1
    assert not constrained.ready, "its next mask needs the token in flight"


def test_a_row_with_a_token_in_flight_is_scheduled_again_at_once():
    s = build()
    s.add(seq(0, max_tokens=5))
    out, sampled = launch(s)
    assert [(q.seq_id, n) for q, n in out.rows] == [("r0", 3)]
    out, _ = launch(s)  # step 1's token has not come back: step 2 computes it anyway (PENDING_TOKEN)
    assert [(q.seq_id, n) for q, n in out.rows] == [("r0", 1)] and sampled[0].num_inflight == 2


def test_a_preempted_sequence_with_a_token_in_flight_blocks_admission_until_the_token_lands():
    s = build(num_blocks=5, block_size=4, enable_prefix_caching=False)  # 4 usable blocks of 4
    a, b = seq(0, n_prompt=4, max_tokens=8), seq(1, n_prompt=4, max_tokens=8, first=40)
    s.add(a)
    s.add(b)
    in_flight = []
    for _ in range(10):  # the async loop: launch step N + 1, then step N's tokens land
        out, sampled = launch(s)
        if out.num_preempted:
            break
        land(in_flight)
        in_flight = sampled
    assert out.preempted_ids == ("r1",) and s.waiting[0] is b and b.num_inflight == 1, "b went with a token out"
    a.finish_reason = "length"  # a ends: blocks are plenty, but b's recompute must include its token in flight
    assert not s.schedule().rows and s.waiting[0] is b
    land(in_flight)
    out = s.schedule()
    assert [(q.seq_id, n) for q, n in out.rows] == [("r1", len(b.token_ids))], "recomputed with the landed token"


def test_a_waiting_sequence_finished_by_its_token_in_flight_is_dropped():
    s = build()
    a = seq(0, max_tokens=4)
    a.num_inflight = 1
    a.finish_reason = "stop"  # e.g. preempted, then its token in flight was EOS
    s.waiting.append(a)
    out = s.schedule()
    assert not out.rows and list(s.waiting) == [] and s.num_waiting == 0


def test_a_step_that_only_preempts_is_not_idle():
    """The newest running sequence preempts itself and nothing else can run: the step computes nothing, but the
    ranks must still hear that the sequence left (it will rejoin with other blocks)."""
    s = build(num_blocks=3, block_size=4, enable_prefix_caching=False)  # 2 usable blocks
    a, b = seq(0, n_prompt=3, max_tokens=1), seq(1, n_prompt=4, max_tokens=4, first=40)
    s.add(a)
    s.add(b)
    launch(s)  # both prefilled, a block each; a's only token and b's first are in flight
    out, _ = launch(s)  # a waits on its last token; b needs a 2nd block for position 4: none free, b is the newest
    assert out.rows == () and out.preempted_ids == ("r1",)
    assert not out.idle
