"""The engine ⇄ gang messages: a step travels as columns and arrives as the same rows."""

import pickle
import random

from raytp.messages import NewRequest, RowInput, SamplingParams, StepInput


def test_a_step_round_trips_through_pickle_as_the_same_rows():
    rng = random.Random(0)
    rows = tuple(RowInput(h, tuple(rng.randrange(400) for _ in range(rng.choice([1, 1, 5]))), rng.randrange(300),
                          rng.random() < 0.8, tuple(rng.sample(range(100), rng.choice([0, 0, 1, 3]))),
                          rng.choice([None, None, 7]), rng.choice([None, None, b"\xff\x00\x00\x01"]))
                 for h in range(12))
    new = (NewRequest("cmpl-1", 3, SamplingParams(max_tokens=4, stop=("x",)).for_ranks(), 9, (1, 2), (5, 6)),)
    for step in (StepInput(new, rows, (4, 8)), StepInput(rows=rows[:3]), StepInput(finished=(1,)),
                 StepInput(rows=tuple(RowInput(h, (h,), 10 + h, True) for h in range(16)))):
        assert pickle.loads(pickle.dumps(step)) == step


def test_a_decode_step_of_16_rows_is_a_few_hundred_bytes():
    step = StepInput(rows=tuple(RowInput(h, (300 + h,), 290 + h, True) for h in range(16)))
    assert len(pickle.dumps(step)) < 300
