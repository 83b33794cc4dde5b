"""The driver's mirror of the ranks' persistent batch (``raytp.engine.step_builder``), on hand-made sequences."""

from raytp.engine.scheduler import SchedulerOutput, Sequence
from raytp.engine.step_builder import StepBuilder
from raytp.messages import PENDING_TOKEN, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def seq(name: str, prompt=(1, 2, 3, 4, 5), params=GREEDY, table=(1, 2), computed: int = 0, outputs=()) -> Sequence:
    s = Sequence(name, tuple(prompt), params)
    s.token_ids += list(outputs)
    s.kv.table, s.num_computed = list(table), computed
    return s


def step(rows=(), finished=(), preempted=()) -> SchedulerOutput:
    return SchedulerOutput(tuple(rows), tuple(finished), tuple(preempted))


def masks(seq_id: str) -> bytes:
    return f"mask of {seq_id}".encode()


def test_a_sequence_joins_once_then_rows_carry_only_what_changed():
    b = StepBuilder(masks)
    a = seq("a", params=SamplingParams(max_tokens=8, stop=("x",)))
    first, sampled = b.build(step([(a, 5)]))
    (joined,) = first.new_requests
    assert (joined.seq_id, joined.block_table, joined.num_prompt_tokens) == ("a", (1, 2), 5)
    assert joined.params.stop == (), "stop strings stay on the driver"
    (row,) = first.rows
    assert (row.token_ids, row.start_pos, row.sample, row.new_blocks) == ((1, 2, 3, 4, 5), 0, True, ())
    assert sampled == [a]
    a.num_computed, a.token_ids = 5, a.token_ids + [9]
    a.kv.table.append(3)
    second, _ = b.build(step([(a, 1)]))
    assert second.new_requests == () and second.rows[0].handle == row.handle
    assert (second.rows[0].token_ids, second.rows[0].new_blocks) == ((9,), (3,)), "only the new block"


def test_prompt_chunks_sample_only_at_the_prompts_end_and_name_the_next_prompt_token():
    b = StepBuilder(masks)
    a = seq("a")
    chunk, sampled = b.build(step([(a, 3)]))
    assert (chunk.rows[0].sample, chunk.rows[0].prompt_next, sampled) == (False, 4, [])
    a.num_computed = 3
    rest, sampled = b.build(step([(a, 2)]))
    assert (rest.rows[0].token_ids, rest.rows[0].sample, rest.rows[0].prompt_next) == ((4, 5), True, None)
    assert sampled == [a]


def test_a_token_in_flight_is_pending():
    b = StepBuilder(masks)
    a = seq("a", computed=5)
    a.num_inflight = 1  # sampled by the step still running: the driver has not seen it
    out, sampled = b.build(step([(a, 1)]))
    assert (out.rows[0].token_ids, out.rows[0].start_pos, out.rows[0].sample) == ((PENDING_TOKEN,), 5, True)
    assert sampled == [a]


def test_departures_ride_on_the_next_step_that_computes_and_free_their_handles_after_it():
    b = StepBuilder(masks)
    a, c = seq("a"), seq("c", table=(3, 4))
    first, _ = b.build(step([(a, 5), (c, 5)]))
    handle_a = first.rows[0].handle
    alone, sampled = b.build(step(finished=["a"]))
    assert (alone, sampled) == (None, []), "no round trip for a departure alone"
    c.num_computed, c.token_ids = 5, c.token_ids + [9]
    d = seq("d", table=(5,))
    out, _ = b.build(step([(c, 1), (d, 5)]))
    assert out.finished == (handle_a,)
    assert out.new_requests[0].handle != handle_a, "a handle is reused only once the ranks have dropped it"
    e = seq("e", table=(6,))
    later, _ = b.build(step([(e, 5)]))
    assert later.finished == () and later.new_requests[0].handle == handle_a
    assert b.num_on_ranks == 3


def test_a_preempted_sequence_rejoins_with_its_whole_table_and_its_history_when_sampling_reads_it():
    penalized = SamplingParams(max_tokens=8, repetition_penalty=1.2)
    b = StepBuilder(masks)
    a = seq("a", params=penalized)
    b.build(step([(a, 5)]))
    a.kv.table, a.num_computed = [], 0  # preempted: blocks freed
    assert b.build(step(preempted=["a"])) == (None, [])
    a.kv.table, a.num_computed = [7, 8], 4  # re-admitted over a cached prefix of 4 tokens
    a.token_ids += [9]
    out, _ = b.build(step([(a, 2)]))
    assert len(out.finished) == 1 and out.new_requests[0].block_table == (7, 8)
    assert out.new_requests[0].history == (1, 2, 3, 4), "penalties read the cached prefix's tokens"
    assert out.rows[0].new_blocks == ()


def test_only_sampled_rows_of_constrained_sequences_carry_a_mask():
    b = StepBuilder(masks)
    constrained = SamplingParams(max_tokens=8, grammar="start: /a+/")
    g, h, plain = seq("g", params=constrained), seq("h", params=constrained, table=(3,)), seq("p", table=(4,))
    out, _ = b.build(step([(g, 5), (h, 2), (plain, 5)]))
    assert [r.allowed for r in out.rows] == [b"mask of g", None, None]
    assert out.new_requests[0].params.grammar is None, "the grammar stays on the driver"
