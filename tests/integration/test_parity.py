"""TP=2 (DeepSpeed AutoTP over gloo + shm all-reduce, 2 Ray actors) == TP=1 == plain transformers, float32 greedy."""

import pytest
import torch

from tests.conftest import run_gang

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer.encode(t) for t in ("the model serves tokens", "requests arrive and stream on xpu devices quickly")]


@pytest.fixture(scope="module")
def hf_reference(tiny_model_path, prompts):
    from transformers import AutoModelForCausalLM

    from raytp.compat import dtype_kwarg

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, **dtype_kwarg(torch.float32)).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        out.append(gen[0, len(p):].tolist())
    return out


def test_tp2_equals_tp1_equals_transformers(ray_session, tiny_model_path, prompts, hf_reference):
    cfg = {"model": "raytp-tiny-llama", "dtype": "float32", "device": "cpu"}
    tp1 = [run_gang({**cfg, "tensor_parallel_size": 1}, [p], MAX_TOKENS)[0] for p in prompts]
    tp2 = [run_gang({**cfg, "tensor_parallel_size": 2}, [p], MAX_TOKENS)[0] for p in prompts]
    assert tp1 == hf_reference
    assert tp2 == hf_reference
    assert len(set(map(tuple, tp2))) == 2, "different prompts give different outputs (the check can fail)"


def test_tp2_batched_with_padding_equals_tp1_batched(ray_session, prompts):
    cfg = {"model": "raytp-tiny-llama", "dtype": "float32", "device": "cpu"}
    tp1 = run_gang({**cfg, "tensor_parallel_size": 1}, prompts, MAX_TOKENS)
    tp2 = run_gang({**cfg, "tensor_parallel_size": 2}, prompts, MAX_TOKENS)
    assert tp2 == tp1
