"""The model runner's rows and KV cache on CPU, without Ray: rows dropped and added between steps (prompts of
different lengths, so rows are padded differently) produce exactly the tokens each prompt gets alone."""

import pytest
import torch

from raytp.gang.model_runner import ModelRunner
from raytp.messages import SamplingParams, SeqInput, StepInput, StepOutput

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
PROMPTS = {"a": (5, 17, 33, 2, 48, 9, 71), "b": (12, 40), "c": (7, 7, 90, 61, 3, 18, 25, 44, 11, 6, 29)}


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    from raytp.compat import dtype_kwarg

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, **dtype_kwarg(torch.float32)).eval()


def alone(model, prompt: tuple[int, ...], n: int) -> list[int]:
    """Greedy tokens with no KV cache at all: the whole sequence recomputed for every token."""
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            out.append(token)
    return out


def test_rows_dropped_and_added_between_steps_keep_their_outputs(model):
    runner = ModelRunner(model, "cpu", rank=0, world_size=1)
    got = {k: [] for k in PROMPTS}

    def step(rows: list[str], **kw) -> None:
        out = runner.step(StepInput(**kw))
        assert isinstance(out, StepOutput) and len(out.tokens) == len(rows)
        for row, token in zip(rows, out.tokens):
            got[row].append(token)

    step(["a", "b"], new=(SeqInput("a", PROMPTS["a"], GREEDY), SeqInput("b", PROMPTS["b"], GREEDY)))
    for _ in range(3):
        step(["a", "b"], decode=True)
    step(["c"], finished_ids=("a",), new=(SeqInput("c", PROMPTS["c"], GREEDY),))  # a leaves, longer c joins
    for _ in range(2):
        step(["b", "c"], decode=True)
    step(["c"], finished_ids=("b",), decode=True)  # b leaves in the same step that decodes c
    assert runner.rows == ["c"]
    assert runner.step(StepInput(finished_ids=("c",))) == StepOutput()  # release only
    assert runner.rows == [] and runner.cache is None

    assert {k: len(v) for k, v in got.items()} == {"a": 4, "b": 6, "c": 4}
    for row, tokens in got.items():
        assert tokens == alone(model, PROMPTS[row], len(tokens)), row

